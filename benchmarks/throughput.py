"""Throughput: http steps per second one hopwatch process carries on one core, with a fresh
connection per run and with connections reused, and the CPU each step costs; a bare aiohttp
client loop on the same core as the ceiling to compare with.

hopwatch is driven through the engine's runner (the real MetricsSink and HTTP pool), over 100
distinct flows so label lookups are not one hot cache entry.
"""

from __future__ import annotations

import itertools
from typing import Any

import aiohttp

from benchmarks.common import CpuClock, Ctx
from benchmarks.harness import build_engine, http_flow
from benchmarks.loadgen import closed_loop

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
    """The ceiling: aiohttp GETs back to back, nothing else (force_close = fresh connection)."""
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
    """hopwatch's http flow, then a bare aiohttp loop, each with fresh and reused connections."""
    duration = ctx.seconds(2.0, 6.0)
    rows = ctx.rows("throughput")
    for reuse, case in CASES:
        result = ctx.child(
            "throughput.hopwatch_http",
            {"reuse": reuse, "concurrency": CONCURRENCY, "duration": duration, "warmup": 0.5},
        )
        rows.append({"tool": "hopwatch", "case": f"http flow, {case}", "reuse": reuse, **result})
        ctx.log(f"  hopwatch http, {case}: {result['steps_per_s']:,.0f} steps/s")
    for reuse, case in CASES:
        result = ctx.child(
            "throughput.bare_aiohttp",
            {"reuse": reuse, "concurrency": CONCURRENCY, "duration": duration},
        )
        rows.append({"tool": "bare aiohttp loop", "case": f"GET, {case}", "reuse": reuse, **result})
        ctx.log(f"  bare aiohttp, {case}: {result['steps_per_s']:,.0f} req/s")


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
