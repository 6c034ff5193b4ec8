"""Throughput: http steps per second one hopwatch process carries on one core, with a fresh
connection per run and with connections reused, and the CPU each step costs; a bare aiohttp
client loop on the same core as the ceiling to compare with.

hopwatch is driven through the engine's runner (the real MetricsSink and HTTP pool), over 100
distinct flows so label lookups are not one hot cache entry.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
from typing import Any

import aiohttp

from benchmarks import blackbox
from benchmarks.common import CpuClock, Ctx, median_round
from benchmarks.harness import build_engine, http_flow
from benchmarks.loadgen import closed_loop
from monitor.gc_settle import settle_start

FLOWS = 100


async def hopwatch_http(args: dict[str, Any]) -> dict[str, Any]:
    """Closed loop through the engine's runner for `duration` seconds at `concurrency`.

    Workers call `Runner.run` back to back, as the scheduler's loops do when every flow is
    due (the scheduler's own sleep is left out; its lag is measured by the scale part),
    cycling over the flows so each run looks up its own series."""
    url = args["target"] + "/ok"
    flows = [http_flow(f"tp{i}", url, reuse=args["reuse"]) for i in range(FLOWS)]
    engine = build_engine(flows, max_concurrency=args["concurrency"])
    await engine.start(schedule=False, admin=False)
    pairs = itertools.cycle(engine.select())
    run = engine.runner.run

    async def once() -> bool:
        flow, variant = next(pairs)
        return (await run(flow, variant)).outcome == "success"

    try:
        await closed_loop(16, args["warmup"], once)  # seconds
        clock = CpuClock()
        clock.start()
        ok, failed = await closed_loop(args["concurrency"], args["duration"], once)
        clock.stop()
    finally:
        await engine.stop()
    return _rates(ok + failed, failed, clock, steps_per_run=1)


async def bare_aiohttp(args: dict[str, Any]) -> dict[str, Any]:
    """The ceiling: aiohttp GETs back to back, nothing else (force_close = fresh connection);
    the collector settled as hopwatch settles its own, as in webhooks.bare_aiohttp."""
    settle_start()
    url = args["target"] + "/ok"
    connector = aiohttp.TCPConnector(limit=0, force_close=not args["reuse"])
    async with aiohttp.ClientSession(connector=connector) as session:

        async def once() -> bool:
            async with session.get(url) as resp:
                await resp.read()
                return resp.status == 200

        await closed_loop(16, 0.5, once)
        clock = CpuClock()
        clock.start()
        ok, failed = await closed_loop(args["concurrency"], args["duration"], once)
        clock.stop()
    return _rates(ok + failed, failed, clock, steps_per_run=1)


def _rates(runs: int, failed: int, clock: CpuClock, *, steps_per_run: int) -> dict[str, Any]:
    steps = runs * steps_per_run
    return clock.summary() | {
        "runs": runs,
        "failed": failed,
        "runs_per_s": round(runs / clock.wall, 1),
        "steps_per_s": round(steps / clock.wall, 1),
        "cpu_us_per_step": round(clock.cpu / steps * 1e6, 1) if steps else None,
    }


CONCURRENCY = 32
CASES = ((False, "fresh connection per run"), (True, "connections reused"))


def part(ctx: Ctx) -> None:
    """hopwatch (fresh and reused connections), blackbox_exporter and a bare aiohttp loop, in
    rounds: every tool is measured once per round, so a machine whose speed drifts (a shared
    VM: 2x between minutes, seen here) slows each tool alike. A row is the tool's median round;
    the ratios against blackbox_exporter are taken round by round (see `paired_ratios`)."""
    rounds = 2 if ctx.quick else 3
    duration = ctx.seconds(1.5, 3.0)
    plan: list[tuple[str, str, bool, str, dict[str, Any], int | None]] = []
    for reuse, case in CASES:
        args: dict[str, Any] = {
            "reuse": reuse, "concurrency": CONCURRENCY, "duration": duration, "warmup": 0.5
        }  # fmt: skip
        plan.append(("hopwatch", f"http flow, {case}", reuse, "throughput.hopwatch_http", args,
                     None))  # fmt: skip
    with contextlib.ExitStack() as stack:
        if blackbox.binary() is None:
            ctx.log(f"  {blackbox.BINARY} not found: `{blackbox.INSTALL_HINT}`; not compared")
        else:
            url, pid = stack.enter_context(blackbox.exporter(ctx.monitor_core))
            args = {"exporter": url, "pid": pid, "concurrency": CONCURRENCY, "duration": duration}
            plan.append(("blackbox_exporter", "/probe, fresh connection per probe", False,
                         "blackbox.throughput", args, ctx.target_core))  # fmt: skip
        for reuse, case in CASES:
            args = {"reuse": reuse, "concurrency": CONCURRENCY, "duration": duration}
            plan.append(("bare aiohttp loop", f"GET, {case}", reuse, "throughput.bare_aiohttp",
                         args, None))  # fmt: skip
        measured: list[list[dict[str, Any]]] = [[] for _ in plan]
        for n in range(rounds):
            for (tool, case, _reuse, func, args, core), results in zip(plan, measured, strict=True):
                result = ctx.child(func, args, core=core)
                results.append(result)
                ctx.log(f"  round {n + 1}, {tool}, {case}: {result['steps_per_s']:,.0f}/s")
    rows = ctx.rows("throughput")
    for (tool, case, reuse, _func, _args, _core), results in zip(plan, measured, strict=True):
        rows.append(
            {"tool": tool, "case": case, "reuse": reuse, **median_round(results), "rounds": results}
        )


def paired_ratios(tool: dict[str, Any], base: dict[str, Any]) -> tuple[float, float]:
    """(rate ratio, CPU-per-step ratio) of `tool` over `base`: the median of the per-round
    ratios when both were measured in the same rounds, else of their rows."""
    a, b = tool.get("rounds") or [tool], base.get("rounds") or [base]
    if len(a) != len(b):
        a, b = [tool], [base]
    rates = [x["steps_per_s"] / y["steps_per_s"] for x, y in zip(a, b, strict=True)]
    cpus = [y["cpu_us_per_step"] / x["cpu_us_per_step"] for x, y in zip(a, b, strict=True)]
    return statistics.median(rates), statistics.median(cpus)


def max_rate(ctx: Ctx, reuse: bool) -> float:
    """hopwatch's measured steps/s for this connection mode (measured now if not yet)."""
    for row in ctx.results.get("throughput", []):
        if row["tool"] == "hopwatch" and row["reuse"] == reuse:
            return float(row["steps_per_s"])
    result = ctx.child(
        "throughput.hopwatch_http",
        {"reuse": reuse, "concurrency": CONCURRENCY, "duration": 2.0, "warmup": 0.5},
    )
    ctx.results.setdefault("calibration", []).append({"reuse": reuse, **result})
    return float(result["steps_per_s"])
