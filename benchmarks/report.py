"""Turns benchmark results into markdown tables (printed, and pasted into the README)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def fmt(value: Any, digits: int = 0) -> str:
    """A number for a table: thousands separators, `—` when missing, `>2.5 s` for +Inf lag."""
    if value is None:
        return "—"
    if isinstance(value, float) and math.isnan(value):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "> 2500"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table with columns padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def machine_line(info: dict[str, Any]) -> str:
    loop = f"uvloop {info.get('uvloop_version', '')}".strip() if info["uvloop"] else "asyncio"
    return (
        f"{info['cpu_model']}, {info['cores']} cores ({info['cores_usable']} usable), "
        f"{info['memory_gib']} GiB, Linux {info['kernel']}, Python {info['python']}, "
        f"aiohttp {info['aiohttp']}, {loop}; load average at start "
        f"{'/'.join(str(x) for x in info['load_avg_at_start'])}"
    )


def throughput_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["tool (one core)", "case", "steps/s", "CPU µs/step", "CPU-bound capacity/s",
         "CPU busy", "CPU stolen", "VM steal", "failed"],
        [
            [r["tool"], r["case"], fmt(r.get("steps_per_s")), fmt(r.get("cpu_us_per_step")),
             fmt(1e6 / r["cpu_us_per_step"]) if r.get("cpu_us_per_step") else "—",
             pct(r.get("cpu_share")), pct(r.get("cpu_wait_share")), pct(r.get("vm_steal_share")),
             fmt(r.get("failed"))]
            for r in rows
        ],
    )  # fmt: skip


def fidelity_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["tool", "case", "load", "rate/s (wanted → done)", "error p50 ms", "error p99 ms",
         "error max ms", "loop lag p99 ms", "sched. lag p99 ms", "GC max ms",
         "target stall max ms", "CPU busy", "CPU stolen", "VM steal"],
        [
            [r["tool"], r["case"], r["load"],
             f"{fmt(r.get('rate_target'))} → {fmt(r.get('rate_achieved'))}",
             fmt(r["error"]["p50_ms"], 2), fmt(r["error"]["p99_ms"], 2),
             fmt(r["error"]["max_ms"], 1),
             fmt(r.get("loop_lag", {}).get("p99_ms"), 1) if "loop_lag" in r else "n/a",
             fmt(r.get("scheduler_lag", {}).get("p99_ms"), 1) if "scheduler_lag" in r else "n/a",
             fmt(_gc_max_ms(r), 1) if "gc" in r else "n/a",
             fmt(r.get("target_lag", {}).get("max_ms"), 1),
             pct(r.get("cpu_share")), pct(r.get("cpu_wait_share")), pct(r.get("vm_steal_share"))]
            for r in rows
        ],
    )  # fmt: skip


def scale_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["flows", "jitter", "config load s", "RSS MiB (started → after runs)", "peak MiB",
         "runs", "sched. lag p50 ms", "sched. lag p99 ms", "loop lag p99 ms",
         "GC max ms", "VM steal"],
        [
            [fmt(r["flows"]), r["jitter"], fmt(r["load_s"], 1),
             f"{fmt(r['memory']['engine_started']['rss_mib'])} → {fmt(r['rss_mib'])}",
             fmt(r["peak_mib"]), fmt(r["runs"]),
             fmt(r["scheduler_lag"]["p50_ms"], 1), fmt(r["scheduler_lag"]["p99_ms"], 1),
             fmt(r["loop_lag"]["p99_ms"], 1), fmt(_gc_max_ms(r), 0),
             pct(r.get("vm_steal_share"))]
            for r in rows
        ],
    )  # fmt: skip


def _gc_max_ms(row: dict[str, Any]) -> float:
    """The longest collector pause of any generation while measured."""
    return float(max(row["gc"][f"gen{g}"]["max_ms"] for g in range(3)))


def webhooks_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["server (one core)", "case", "webhooks/s", "CPU µs/webhook", "of which handler µs",
         "finished expectations remembered", "GC max ms", "VM steal", "failed"],
        [
            [r.get("tool", "hopwatch"), r["case"], fmt(r.get("steps_per_s")),
             fmt(r.get("cpu_us_per_step")), fmt(r.get("receiver_us")),
             (f"{fmt(r['finished_remembered'])} of {fmt(r['finished_max'])}"
              if r.get("finished_max") else "—"),
             fmt(_gc_max_ms(r), 1) if "gc" in r else "—",
             pct(r.get("vm_steal_share")), fmt(r.get("failed"))]
            for r in rows
        ],
    )  # fmt: skip


def targets_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["target", "wanted", "measured", "verdict"],
        [[r["target"], r["wanted"], r["measured"], r["verdict"]] for r in rows],
    )


def pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value * 100:.0f} %"
