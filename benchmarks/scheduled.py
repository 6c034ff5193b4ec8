"""Scheduled: checks per CPU-second of `hopwatch run` as users run it (the real command, flows
on their intervals, the default SQLite store), beside blackbox_exporter's /probe driven at the
same offered rates, each pinned alone to the monitor's core.

Three loads per tool: saturated (more offered than it can carry: hopwatch 400 flows every 50 ms,
fresh connections, or 800 reused; blackbox_exporter a closed loop of 32 probes in flight), and
10 % and 50 % of blackbox_exporter's saturated rate of the same round, offered alike (hopwatch:
that many one-second flows, starts spread over 0.9 s; blackbox_exporter: an open loop from a
driver on the target's core). A check is a request the target answered (its own count), so
both tools are counted the same way; CPU is the measured process's (/proc/PID/stat) over the
same window; the machine's load average is recorded beside each row, since a busy machine
slows every tool.

Where a saturated check's CPU goes is measured in the same round (`breakdown`): hopwatch's own
closed loop (the runner back to back, 32 in flight, no scheduler, no store: the floor), then
`hopwatch run --store none`, then `hopwatch run` with its store; the differences are the
scheduler's and the store's shares. Comparing a scheduled figure with a closed loop from another
hour misleads: this VM's speed for Python drifts by 2x between hours (a fresh closed-loop check
268 µs in one run, 455-660 µs in another on the same code).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import blackbox
from benchmarks.common import (
    ROOT,
    Ctx,
    cpu_steal_s,
    free_port,
    get_json,
    proc_cpu_s,
    runqueue_wait_s,
    stop_process,
    wait_http,
)
from benchmarks.loadgen import closed_loop, open_loop

SATURATED = {False: (400, 0.05), True: (800, 0.05)}  # reuse → (flows, interval s)
CLOSED_CONCURRENCY = 32  # as throughput.py's closed loop and blackbox_exporter's saturated driver
CLOSED, NO_STORE, RUN = "hopwatch closed loop", "hopwatch run --store none", "hopwatch run"
SHARES = (0.1, 0.5)
RATE_INTERVAL = 1.0
RATE_JITTER = 0.9


def flows_yaml(
    n: int, url: str, interval: float, jitter: float | None, reuse: bool, settings: str = ""
) -> str:
    lines = [f"settings: {{{settings}}}", "flows:"] if settings else ["flows:"]
    extra = f", jitter: {jitter}s" if jitter is not None else ""
    keep = "true" if reuse else "false"
    for i in range(n):
        lines.append(
            f"  - {{name: s{i}, interval: {interval}s{extra}, reuse_connections: {keep},"
            f" steps: [{{name: get, kind: http, url: '{url}', expect: {{status: 200}}}}]}}"
        )
    return "\n".join(lines) + "\n"


def _counters(target: str, pid: int, core: int) -> tuple[int, float, float, float]:
    requests: int = get_json(target + "/stats")["requests"]
    return requests, proc_cpu_s(pid), runqueue_wait_s(pid), cpu_steal_s(core)


def _outcomes(admin: str) -> dict[str, int]:
    """hopwatch_runs_total summed by outcome, from the monitor's /metrics."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=30) as response:
        text = response.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("hopwatch_runs_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = out.get(outcome, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


def _window(target: str, pid: int, core: int, duration: float) -> dict[str, Any]:
    """Checks the target answered and CPU `pid` used over `duration` seconds from now."""
    r0, c0, q0, s0 = _counters(target, pid, core)
    t0 = time.perf_counter()
    time.sleep(duration)
    wall = time.perf_counter() - t0
    r1, c1, q1, s1 = _counters(target, pid, core)
    checks, cpu = r1 - r0 - 1, c1 - c0  # the first /stats call is counted by the second
    return {
        "checks": checks,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "checks_per_s": round(checks / wall, 1),
        "checks_per_cpu_s": round(checks / cpu, 1) if cpu else None,
        "cpu_us_per_check": round(cpu / checks * 1e6, 1) if checks else None,
        "cpu_share": round(cpu / wall, 3),
        "cpu_wait_share": round((q1 - q0) / wall, 3),
        "vm_steal_share": round((s1 - s0) / wall, 3),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def hopwatch_run(
    ctx: Ctx,
    *,
    reuse: bool,
    rate: float | None,
    duration: float,
    extra: tuple[str, ...] = (),
    settings: str = "",
) -> dict[str, Any]:
    """`hopwatch run` (python -m monitor run) with its default store, pinned to the monitor core;
    saturated when `rate` is None, else `rate` one-second flows."""
    if rate is None:
        n, interval = SATURATED[reuse]
        jitter = None  # the default (10 % of the interval)
    else:
        n, interval, jitter = max(1, round(rate * RATE_INTERVAL)), RATE_INTERVAL, RATE_JITTER
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flows.yaml"
        path.write_text(flows_yaml(n, ctx.target.url + "/ok", interval, jitter, reuse, settings))
        admin, listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "monitor", "run", str(path), "--admin-listen", admin,
               "--listen", listen, "--log-level", "warning", "--grace", "1", *extra]  # fmt: skip
        core = ctx.monitor_core
        proc = subprocess.Popen(  # in the temp dir: the default store, hopwatch.db, lands there
            cmd, cwd=tmp, env=env, text=True, stdout=subprocess.DEVNULL,
            preexec_fn=lambda: os.sched_setaffinity(0, {core}),
        )  # fmt: skip
        try:
            wait_http(f"http://{admin}/readyz", timeout=30)
            time.sleep(ctx.seconds(3.0, 5.0))  # every flow ran, the collector settled
            before = _outcomes(admin)
            result = _window(ctx.target.url, proc.pid, core, duration)
            after = _outcomes(admin)
            # Runs that ended in the window by outcome: CPU spent on runs the target never
            # answered (refused or timed-out connects) is in the CPU but not in the checks.
            result["runs"] = {k: after[k] - before.get(k, 0) for k in sorted(after)}
            store = Path(tmp) / "hopwatch.db"
            result["store_bytes"] = store.stat().st_size if store.exists() else 0
        finally:
            stop_process(proc, grace=10)
    return {"flows": n, "interval_s": interval, "offered_per_s": round(n / interval, 1), **result}


async def blackbox_driver(args: dict[str, Any]) -> dict[str, Any]:
    """On the target's core: /probe at `rate` (open loop) or 32 in flight (closed), warm-up
    first; the window is measured from here (the exporter's CPU, the target's count)."""
    url = f"{args['exporter']}/probe?module=http_2xx&target={args['target']}/ok"
    rate, duration = args.get("rate"), args["duration"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def once() -> bool:
            async with session.get(url) as resp:
                await resp.read()
                return resp.status == 200

        async def fire(_: int) -> None:
            with contextlib.suppress(aiohttp.ClientError):
                await once()

        loop = asyncio.get_running_loop()
        task: asyncio.Future[Any]
        if rate is None:
            await closed_loop(32, 1.0, once)
            task = asyncio.ensure_future(closed_loop(32, duration + 2.0, once))
        else:
            task = asyncio.ensure_future(open_loop(rate, duration + 2.0, fire))
        await asyncio.sleep(1.0)
        measured = await loop.run_in_executor(
            None, _window, args["target"], args["pid"], args["core"], duration
        )
        await task
    return measured


def closed_loop_run(ctx: Ctx, reuse: bool, duration: float) -> dict[str, Any]:
    """hopwatch's floor in this round: its runner back to back (throughput.hopwatch_http, 32 in
    flight, no scheduler, no store), in the scheduled rows' fields."""
    args = {"reuse": reuse, "concurrency": CLOSED_CONCURRENCY, "duration": duration,
            "warmup": 0.5}  # fmt: skip
    r = ctx.child("throughput.hopwatch_http", args)
    return {"offered_per_s": None, "checks": r["runs"],
            "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "checks_per_s": r["steps_per_s"],
            "checks_per_cpu_s": round(1e6 / r["cpu_us_per_step"], 1),
            "cpu_us_per_check": r["cpu_us_per_step"], "cpu_share": r["cpu_share"],
            "load_avg": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip


def blackbox_run(
    ctx: Ctx, url: str, pid: int, rate: float | None, duration: float
) -> dict[str, Any]:
    args = {"exporter": url, "pid": pid, "core": ctx.monitor_core, "duration": duration,
            "rate": rate}  # fmt: skip
    result = ctx.child("scheduled.blackbox_driver", args, core=ctx.target_core)
    return {"offered_per_s": rate, **result}


def part(ctx: Ctx) -> None:
    """Per round: blackbox_exporter saturated (its ceiling), hopwatch saturated (fresh, reused),
    then both at 10 % and 50 % of that ceiling."""
    if blackbox.binary() is None:
        ctx.log(f"  {blackbox.BINARY} not found: `{blackbox.INSTALL_HINT}`; skipping")
        ctx.results.setdefault("skipped", {})["scheduled"] = blackbox.INSTALL_HINT
        return
    rounds = 1 if ctx.quick else 2
    duration = ctx.seconds(4.0, 8.0)
    rows = ctx.rows("scheduled")
    for n in range(rounds):
        with blackbox.exporter(ctx.monitor_core) as (url, pid):
            top = blackbox_run(ctx, url, pid, None, duration)
            rows.append({"round": n + 1, "tool": "blackbox_exporter", "reuse": False,
                         "load": "saturated", **top})  # fmt: skip
            ceiling = top["checks_per_s"]
            ctx.log(f"  round {n + 1}, blackbox_exporter saturated: {_line(top)}")
            for share in SHARES:
                rate = round(share * ceiling)
                row = blackbox_run(ctx, url, pid, rate, duration)
                rows.append({"round": n + 1, "tool": "blackbox_exporter", "reuse": False,
                             "load": f"{share:.0%} of blackbox_exporter's max", **row})  # fmt: skip
                ctx.log(f"  round {n + 1}, blackbox_exporter at {rate:,}/s: {_line(row)}")
        for reuse in (False, True):
            case = "reused" if reuse else "fresh"
            # Saturated: the floor, the store-less run and the headline run, then the same
            # backwards (a palindrome: a drift of the VM's speed within the round weighs on
            # each alike); `breakdown` splits a check from them, the ratios take the first.
            for i, tool in enumerate((CLOSED, NO_STORE, RUN, RUN, NO_STORE, CLOSED)):
                if tool == CLOSED:
                    row = closed_loop_run(ctx, reuse, duration)
                else:
                    extra = ("--store", "none") if tool == NO_STORE else ()
                    row = hopwatch_run(ctx, reuse=reuse, rate=None, duration=duration, extra=extra)
                rows.append({"round": n + 1, "tool": tool, "reuse": reuse, "load": "saturated",
                             "repeat": i >= 3, **row})  # fmt: skip
                ctx.log(f"  round {n + 1}, {tool} {case}, saturated: {_line(row)}")
            for wanted in SHARES:
                fixed = float(round(wanted * ceiling))
                row = hopwatch_run(ctx, reuse=reuse, rate=fixed, duration=duration)
                load = f"{wanted:.0%} of blackbox_exporter's max"
                rows.append({"round": n + 1, "tool": RUN, "reuse": reuse,
                             "load": load, **row})  # fmt: skip
                ctx.log(f"  round {n + 1}, hopwatch run {case}, {load}: {_line(row)}")


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['checks_per_s']:,.0f}/s, {row['checks_per_cpu_s'] or 0:,.0f} per CPU-s "
        f"({row['cpu_us_per_check']} µs), CPU {row['cpu_share']:.0%}, load {row['load_avg'][0]}"
    )


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| round | tool | connections | load | offered/s | checks/s | per CPU-s | CPU µs "
             "| CPU | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        offered = f"{r['offered_per_s']:,.0f}" if r.get("offered_per_s") else "closed loop"
        tool = r["tool"] + (" (again)" if r.get("repeat") else "")
        lines.append(
            f"| {r['round']} | {tool} | {'reused' if r['reuse'] else 'fresh'} | {r['load']} "
            f"| {offered} | {r['checks_per_s']:,.0f} | {r['checks_per_cpu_s'] or 0:,.0f} "
            f"| {r['cpu_us_per_check']} | {r['cpu_share']:.0%} | {r['load_avg'][0]} |"
        )
    split = breakdown(rows)
    if split:
        lines += ["", "Where a saturated check's CPU goes (µs a check, median of the rounds; "
                  "each round's runs back to back):", "",
                  "| connections | closed loop (runner, metrics) | + scheduler | + store "
                  "| `hopwatch run` | rounds (floor / scheduler / store) |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for b in split:
            each = "; ".join(f"{f:.0f} / {sc:+.0f} / {st:+.0f}" for f, sc, st in b["rounds"])
            lines.append(
                f"| {'reused' if b['reuse'] else 'fresh'} | {b['floor_us']:.0f} "
                f"| {b['scheduler_us']:+.0f} | {b['store_us']:+.0f} | {b['run_us']:.0f} | {each} |"
            )
    return "\n".join(lines)


def breakdown(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CPU µs a saturated check: the closed loop's, what the scheduler adds (`--store none` minus
    the closed loop) and what the store adds (`hopwatch run` minus `--store none`), round by
    round from runs measured back to back (each tool's runs of the round averaged), then the
    median of the rounds."""
    out = []
    for reuse in (False, True):
        each = []
        for rnd in sorted({r["round"] for r in rows}):
            us: dict[str, list[float]] = {CLOSED: [], NO_STORE: [], RUN: []}
            for r in rows:
                if (r["round"], r["reuse"], r["load"]) == (rnd, reuse, "saturated") and r[
                    "cpu_us_per_check"
                ]:
                    us.get(r["tool"], []).append(r["cpu_us_per_check"])
            if all(us.values()):
                floor, bare, run = (statistics.mean(us[t]) for t in (CLOSED, NO_STORE, RUN))
                each.append((floor, bare - floor, run - bare))
        if each:
            out.append({"reuse": reuse,
                        "floor_us": statistics.median(x[0] for x in each),
                        "scheduler_us": statistics.median(x[1] for x in each),
                        "store_us": statistics.median(x[2] for x in each),
                        "run_us": statistics.median(sum(x) for x in each),
                        "rounds": each})  # fmt: skip
    return out


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """hopwatch run over blackbox_exporter, checks per CPU-second, load by load, round by round
    (the median of the rounds' ratios)."""
    out = []
    for reuse in (False, True):
        for load in ("saturated", *(f"{s:.0%} of blackbox_exporter's max" for s in SHARES)):
            each = []
            for hw in rows:
                if (
                    hw["tool"] != RUN
                    or hw["reuse"] != reuse
                    or hw["load"] != load
                    or hw.get("repeat")
                ):
                    continue
                bb = next((r for r in rows if r["tool"] == "blackbox_exporter"
                           and r["load"] == load and r["round"] == hw["round"]), None)  # fmt: skip
                if bb and hw["checks_per_cpu_s"] and bb["checks_per_cpu_s"]:
                    each.append(hw["checks_per_cpu_s"] / bb["checks_per_cpu_s"])
            if each:
                out.append({"reuse": reuse, "load": load, "ratio": statistics.median(each),
                            "rounds": [round(x, 2) for x in each]})  # fmt: skip
    return out
