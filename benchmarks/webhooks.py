"""Webhook receiver: signed webhooks per second that one hopwatch process verifies and matches to
waiting runs on one core.

Each delivery completes a real run: the engine's runner runs a flow whose one step is
`webhook_await` (Standard Webhooks signature, match on `$.ref` = the run's correlation), the
receiver verifies the signature on the public listener, the correlator hands the arrival to the
step, and the result goes through the real MetricsSink. Runs are started in batches of `batch`;
once a batch is waiting, a sender on the other core (benchmarks.senders) delivers one webhook per
run over kept-alive connections, while the next batch is registered. Run ids are made
predictable (a counter instead of random hex) so the sender knows each run's correlation.
"""

from __future__ import annotations

import asyncio
import sys
import time
from itertools import count
from typing import Any

import aiohttp

from benchmarks.common import CpuClock, Ctx, free_port, start_pinned, stop_process, wait_http
from benchmarks.harness import build_engine
from benchmarks.senders import SECRET
from monitor.config import Flow

PATH = "/hooks/bench"


def webhook_flow() -> Flow:
    return Flow.model_validate({
        "name": "webhooks",
        "timeout": "30s",
        "steps": [{
            "name": "hook", "kind": "webhook_await", "path": PATH, "within": "20s",
            "signature": {"scheme": "standard_webhooks", "secret": SECRET},
            "match": {"json": {"$.ref": "{{ run.correlation }}"}},
        }],
    })  # fmt: skip


async def hopwatch_webhooks(args: dict[str, Any]) -> dict[str, Any]:
    import monitor.runner

    issued = count()
    monitor.runner.new_run_id = lambda: f"{next(issued):016x}"  # known to the sender
    flow = webhook_flow()
    engine = build_engine([flow], max_concurrency=4 * args["batch"])
    await engine.start(schedule=False, admin=False)
    url = f"http://{engine.options.listen}{PATH}"
    next_id = 0
    curve: list[tuple[int, float]] = []
    window = asyncio.Semaphore(2)  # one batch delivered while the next one registers

    async def batch(session: aiohttp.ClientSession, size: int) -> tuple[int, int]:
        nonlocal next_id
        first, next_id = next_id, next_id + size
        try:
            runs = [asyncio.create_task(engine.runner.run(flow, "default")) for _ in range(size)]
            for _ in range(3):  # let every run register its expectation before anything is sent
                await asyncio.sleep(0)
            refs = [f"hw-{i:016x}" for i in range(first, first + size)]
            job = {"url": url, "refs": refs}
            async with session.post(args["driver"] + "/go", json=job) as resp:
                await resp.read()
            results = await asyncio.gather(*runs)
        finally:
            window.release()
        ok = sum(1 for res in results if res.outcome == "success")
        return ok, size - ok

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            await window.acquire()
            await batch(session, args["batch"])  # warm-up
            clock = CpuClock()
            clock.start()
            sampler = asyncio.create_task(_sample(engine, curve))
            deadline = time.perf_counter() + args["duration"]
            jobs: list[asyncio.Task[tuple[int, int]]] = []
            while time.perf_counter() < deadline:
                await window.acquire()
                jobs.append(asyncio.create_task(batch(session, args["batch"])))
            done = await asyncio.gather(*jobs)
            clock.stop()
            sampler.cancel()
    finally:
        await engine.stop()
    matched = sum(ok for ok, _ in done)
    failed = sum(bad for _, bad in done)
    outcomes = {
        outcome: engine.registry.get_sample_value(
            "hopwatch_arrivals_total", {"source": "webhook", "outcome": outcome}
        )
        for outcome in ("matched", "unmatched", "duplicate", "late", "bad_signature", "malformed")
    }
    return clock.summary() | {
        "runs": matched + failed,
        "failed": failed,
        "steps_per_s": round(matched / clock.wall, 1),
        "cpu_us_per_step": round(clock.cpu / matched * 1e6, 1) if matched else None,
        "arrivals": {k: int(v or 0) for k, v in outcomes.items()},
        "pending_max": 2 * args["batch"],
        "cost_curve": curve,
        **_growth(curve),
    }


async def _sample(engine: Any, curve: list[tuple[int, float]]) -> None:
    """Every second: (finished expectations remembered, CPU µs per matched webhook since)."""
    last_cpu, last_n = time.process_time(), _matched(engine)
    while True:
        await asyncio.sleep(1.0)
        cpu, n = time.process_time(), _matched(engine)
        if n > last_n:
            finished = engine.correlator.stats()["finished"]
            curve.append((finished, round((cpu - last_cpu) / (n - last_n) * 1e6, 1)))
        last_cpu, last_n = cpu, n


def _matched(engine: Any) -> float:
    value = engine.registry.get_sample_value(
        "hopwatch_arrivals_total", {"source": "webhook", "outcome": "matched"}
    )
    return float(value or 0)


def _growth(curve: list[tuple[int, float]]) -> dict[str, Any]:
    """Least-squares line of CPU per webhook against the finished table's size, extrapolated
    to the correlator's steady state (it remembers up to 10,000 finished expectations)."""
    if len(curve) < 3:
        return {}
    xs, ys = [float(x) for x, _ in curve], [y for _, y in curve]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return {}
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
    base = my - slope * mx
    steady = base + slope * 10_000
    return {
        "cpu_us_at_0_finished": round(base, 1),
        "cpu_us_per_1000_finished": round(slope * 1000, 1),
        "cpu_us_at_10000_finished": round(steady, 1),
        "steady_state_per_s": round(1e6 / steady, 1) if steady > 0 else None,
    }


def part(ctx: Ctx) -> None:
    """Start the sender on the target's core, then measure the monitor on its own core."""
    port = free_port()
    sender = start_pinned(
        [sys.executable, "-m", "benchmarks.senders", "webhooks", "--port", str(port)],
        ctx.target_core,
    )
    try:
        driver = f"http://127.0.0.1:{port}"
        wait_http(driver + "/ready")
        batch = 100
        args = {"driver": driver, "batch": batch, "duration": ctx.seconds(3.0, 10.0)}
        result = ctx.child("webhooks.hopwatch_webhooks", args)
    finally:
        stop_process(sender)
    case = f"Standard Webhooks signature, JSON-path match, ≤ {2 * batch} runs waiting"
    ctx.rows("webhooks").append({"tool": "hopwatch", "case": case, **result})
    ctx.log(
        f"  webhooks: {result['steps_per_s']:,.0f}/s verified and matched, "
        f"{result['cpu_us_per_step']:,.0f} µs CPU each"
    )
