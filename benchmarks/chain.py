"""The full chain: steps per second of an http → Kafka → webhook flow on one core.

The system under watch (benchmarks.senders chain, on the target's core with a Tansu broker) takes
`POST /orders`, produces `{"order_id": ref}` to a topic and calls back with a signed webhook;
the flow checks all three hops: `http` (201), `kafka_consume` (the record, matched on
`$.order_id`), `webhook_await` (Standard Webhooks signature, matched on `$.order_id`).
Driven through `Engine.run_once` in batches.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import CpuClock, Ctx, free_port, start_pinned, stop_process, wait_http
from benchmarks.senders import SECRET

FLOWS = 20
HOOK_PATH = "/hooks/chain"


def chain_flow(name: str, base_url: str, topic: str, *, reuse: bool) -> Any:
    from monitor.config import Flow

    match = {"json": {"$.order_id": "{{ run.correlation }}"}}
    return Flow.model_validate({
        "name": name,
        "timeout": "20s",
        "reuse_connections": reuse,
        "variants": {"default": {"base_url": base_url}},
        "steps": [
            {"name": "create_order", "kind": "http", "method": "POST",
             "url": "{{ variant.base_url }}/orders",
             "json": {"ref": "{{ run.correlation }}",
                      "callback_url": "{{ public_url }}" + HOOK_PATH},
             "expect": {"status": 201}},
            {"name": "order_event", "kind": "kafka_consume", "cluster": "main", "topic": topic,
             "match": match, "within": "10s"},
            {"name": "fulfilment", "kind": "webhook_await", "path": HOOK_PATH, "within": "10s",
             "signature": {"scheme": "standard_webhooks", "secret": SECRET}, "match": match},
        ],
    })  # fmt: skip


async def hopwatch_chain(args: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.harness import build_engine

    flows = [
        chain_flow(f"chain{i}", args["chain_url"], args["topic"], reuse=args["reuse"])
        for i in range(FLOWS)
    ]
    engine = build_engine(
        flows, max_concurrency=256, kafka={"main": {"bootstrap_servers": args["bootstrap"]}}
    )
    await engine.start(schedule=False, admin=False)
    pairs = engine.select()
    try:
        await engine.run_once(pairs, repeat=5, concurrency=16)  # warm-up
        clock = CpuClock()
        runs = failed = 0
        reasons: dict[str, int] = {}
        clock.start()
        deadline = time.perf_counter() + args["duration"]
        while time.perf_counter() < deadline:
            results = await engine.run_once(pairs, repeat=10, concurrency=args["concurrency"])
            runs += len(results)
            for result in results:
                broken = result.broken
                if broken is not None:
                    failed += 1
                    key = f"{broken.name}:{broken.reason}"
                    reasons[key] = reasons.get(key, 0) + 1
        clock.stop()
    finally:
        await engine.stop()
    steps = 3 * runs
    return clock.summary() | {
        "runs": runs,
        "failed": failed,
        "broken": reasons,
        "runs_per_s": round(runs / clock.wall, 1),
        "steps_per_s": round(steps / clock.wall, 1),
        "cpu_us_per_step": round(clock.cpu / steps * 1e6, 1) if steps else None,
        "correlator": engine.correlator.stats(),
    }


def _pin_all_threads(pid: int, core: int) -> None:
    """Pin every thread of a running process (a Rust broker starts its workers at once)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), {core})
        except OSError:
            continue


def part(ctx: Ctx) -> None:
    """Broker and chain target on the target's core; the monitor on its own."""
    try:
        from monitor.demo.broker import BrokerError, TansuBroker, resolve_tansu

        resolve_tansu()
    except (ImportError, BrokerError) as exc:
        ctx.log(f"  chain: no Kafka broker ({exc}); skipping this part")
        ctx.results.setdefault("skipped", {})["chain"] = str(exc)
        return
    broker = TansuBroker()
    asyncio.run(broker.start())
    target = None
    try:
        if broker.pid is not None:
            _pin_all_threads(broker.pid, ctx.target_core)
        port, topic = free_port(), f"bench-orders-{os.getpid()}"
        target = start_pinned(
            [sys.executable, "-m", "benchmarks.senders", "chain", "--port", str(port),
             "--kafka", broker.bootstrap, "--topic", topic],
            ctx.target_core,
        )  # fmt: skip
        chain_url = f"http://127.0.0.1:{port}"
        wait_http(chain_url + "/ready", timeout=30)
        for reuse, case in ((False, "fresh connection per run"), (True, "connections reused")):
            args = {"chain_url": chain_url, "bootstrap": broker.bootstrap, "topic": topic,
                    "reuse": reuse, "concurrency": 32,
                    "duration": ctx.seconds(2.0, 6.0)}  # fmt: skip
            result = ctx.child("chain.hopwatch_chain", args)
            ctx.rows("throughput").append(
                {"tool": "hopwatch", "case": f"http → Kafka → webhook flow, {case}",
                 "reuse": reuse, "chain": True, **result}
            )  # fmt: skip
            ctx.log(
                f"  chain, {case}: {result['steps_per_s']:,.0f} steps/s "
                f"({result['runs_per_s']:,.0f} runs/s), {result['failed']} broken"
            )
    finally:
        if target is not None:
            stop_process(target)
        asyncio.run(broker.stop())
        broker.close_log()
