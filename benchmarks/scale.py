"""Scale: memory and scheduler lag of one hopwatch process with 1,000 or 10,000 configured flows.

The flows are written to a YAML file and loaded with `monitor.config.load`, as `hopwatch run`
would, with the default interval (1 m) and either the default jitter (10 % of the interval, so
every flow runs in the first 6 s: the start-up burst) or a jitter of the whole interval (runs
spread evenly). Each flow is one http step against the target's /ok.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import CpuClock, Ctx, GcWatch, HistSnapshot, rss_mib
from benchmarks.harness import CollectSink
from monitor.config import load
from monitor.engine import Engine, Options


def flows_yaml(n: int, url: str, jitter: str | None) -> str:
    lines = ["settings: {max_concurrency: 256}", "flows:"]
    extra = f", jitter: {jitter}" if jitter else ""
    for i in range(n):
        lines.append(
            f"  - {{name: flow{i}{extra}, steps: [{{name: get, kind: http, url: '{url}',"
            " expect: {status: 200}}]}"
        )
    return "\n".join(lines) + "\n"


async def hopwatch_scale(args: dict[str, Any]) -> dict[str, Any]:
    """Load n flows from YAML, start the engine with its scheduler, watch for `duration` s."""
    n = args["flows"]
    memory: dict[str, Any] = {"baseline": rss_mib()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flows.yaml"
        path.write_text(flows_yaml(n, args["target"] + "/ok", args.get("jitter")))
        t0 = time.perf_counter()
        config = load([path])
        load_s = time.perf_counter() - t0
    gc.collect()
    memory["config_loaded"] = rss_mib()
    sink = CollectSink()
    engine = Engine(config, Options(grace=2.0, extra_sinks=[sink], settle_gc=True))  # as `run`
    clock = CpuClock()
    t0 = time.perf_counter()
    await engine.start(schedule=True, admin=False)
    start_s = time.perf_counter() - t0
    memory["engine_started"] = rss_mib()
    try:
        clock.start()
        with GcWatch() as gc_watch:
            await asyncio.sleep(args["duration"])
        clock.stop()
        memory["after_run"] = rss_mib()
        sched_lag = HistSnapshot.take(engine.metrics.scheduler_lag)
        loop_lag = HistSnapshot.take(engine.metrics.loop_lag)
    finally:
        await engine.stop()
    failed = sum(1 for outcome in sink.outcomes if outcome != "success")
    return {
        "flows": n,
        "jitter": args.get("jitter") or "default (10% of 1m)",
        "load_s": round(load_s, 2),
        "start_s": round(start_s, 2),
        "runs": len(sink.outcomes),
        "failed": failed,
        "flows_run": len(engine.last_runs),
        "memory": memory,
        "rss_mib": memory["after_run"]["rss_mib"],
        "peak_mib": memory["after_run"]["peak_mib"],
        "scheduler_lag": sched_lag.summary_ms(),
        "loop_lag": loop_lag.summary_ms(),
        "gc": gc_watch.summary() | {"tracked_objects": len(gc.get_objects())},
        **clock.summary(),
    }


def part(ctx: Ctx) -> None:
    """1,000 and 10,000 flows with the default jitter (and, in a full run, a full-interval one)."""
    cases: list[tuple[int, str | None]] = [(1000, None), (10_000, None)]
    if not ctx.quick:
        cases += [(1000, "1m"), (10_000, "1m")]
    for flows, jitter in cases:
        args = {"flows": flows, "jitter": jitter, "duration": ctx.seconds(3.0, 15.0)}
        result = ctx.child("scale.hopwatch_scale", args)
        ctx.rows("scale").append(result)
        ctx.log(
            f"  {flows:,} flows, jitter {result['jitter']}: RSS {result['rss_mib']:.0f} MiB, "
            f"scheduler lag p99 {result['scheduler_lag']['p99_ms']} ms"
        )
