"""Webhook receiver: signed webhooks per second that one hopwatch process verifies and matches to
waiting runs on one core.

Each delivery completes a real run: the engine's runner runs a flow whose one step is
`webhook_await` (Standard Webhooks signature, match on `$.ref` = the run's correlation), the
receiver verifies the signature on the public listener, the correlator hands the arrival to the
step, and the result goes through the real MetricsSink. Runs are started in batches of `batch`;
once a batch is waiting, a sender on the other core (benchmarks.senders) delivers one webhook per
run over kept-alive connections, while the next batch is registered. Run ids are made
predictable (a counter instead of random hex) so the sender knows each run's correlation.

Measured at the correlator's steady state: warm-up batches run until its table of finished
expectations (kept for late and duplicate detection) is full, as in a monitor that has run for
a while, so every measured webhook also pushes the oldest one out. While that table fills,
every webhook leaves objects alive (its finished expectation and matcher) that the garbage
collector counts and walks: a cost of the first minutes, not of a running monitor.

The receiver path alone is measured the same way without runs (`hopwatch_receiver`): the same
engine and public listener, each batch's expectations registered and indexed with the matcher a
run's step would give the correlator, but no run, task or timer awaiting them; each webhook is
verified, parsed, matched and answered, and its expectation finished.

Beside them, in the same rounds and with the same sender, a bare aiohttp server on the same core
(one route that reads the body and parses its JSON, no signature, no run): the floor any
receiver on aiohttp stands on, which the targets are set against, so the ratio is measured on
this machine rather than a rate compared with one measured elsewhere. hopwatch's public
listener answers plain deliveries from its own connections (monitor/receivers/wire.py), not
aiohttp's, so a second floor is measured too: a bare asyncio protocol with httptools (parse,
JSON, a fixed 202), what those connections stand on.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from itertools import count
from typing import Any

import aiohttp
import httptools
from aiohttp import web

from benchmarks.common import (
    CpuClock,
    Ctx,
    GcWatch,
    callgrind_collecting,
    free_port,
    median_round,
    start_pinned,
    stop_process,
    wait_http,
)
from benchmarks.harness import build_engine
from benchmarks.senders import SECRET
from monitor.config import Flow
from monitor.correlator import Correlator
from monitor.correlator.expectation import Expectation
from monitor.engine import Engine
from monitor.gc_settle import settle_start
from probes.selectors import header_value
from probes.waiting import Rule

PATH = "/hooks/bench"
WARMUP_LIMIT_S = 30.0


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


Batch = Callable[[aiohttp.ClientSession, list[str]], Awaitable[tuple[int, int]]]


async def _drive(
    args: dict[str, Any], batch: Batch, warmed: Callable[[], bool] = lambda: True
) -> dict[str, Any]:
    """Batches of `batch` refs, two in flight (one delivered while the next one registers):
    warm-up batches until `warmed()` (at most `warmup_limit_s`, WARMUP_LIMIT_S unless given;
    at least `warmup_batches`, 1 unless given), then for `duration` seconds or, when given,
    `webhooks` webhooks (whole batches); the rate and CPU counted by the webhooks that went
    through (`steps_per_s`, `cpu_us_per_step`). With `callgrind`, callgrind counts the
    process's instructions over the measured batches alone (benchmarks.webhook_instructions)."""
    next_id = 0
    window = asyncio.Semaphore(2)

    async def one(session: aiohttp.ClientSession) -> tuple[int, int]:
        nonlocal next_id
        first, next_id = next_id, next_id + args["batch"]
        try:
            return await batch(session, [f"hw-{i:016x}" for i in range(first, next_id)])
        finally:
            window.release()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        warm_until = time.perf_counter() + args.get("warmup_limit_s", WARMUP_LIMIT_S)
        for warm in count(1):  # warm-up, one batch at a time
            await window.acquire()
            await one(session)
            if warm >= args.get("warmup_batches", 1) and (
                warmed() or time.perf_counter() > warm_until
            ):
                break
        clock = CpuClock()
        clock.start()
        deadline: float = time.perf_counter() + args.get("duration", 0.0)
        jobs: list[asyncio.Task[tuple[int, int]]] = []

        def more() -> bool:
            if "webhooks" in args:
                return bool(len(jobs) * args["batch"] < args["webhooks"])
            return time.perf_counter() < deadline

        with GcWatch() as gc_watch, callgrind_collecting(args.get("callgrind", False)):
            while more():
                await window.acquire()
                jobs.append(asyncio.create_task(one(session)))
            done = await asyncio.gather(*jobs)
        clock.stop()
    ok, failed = sum(ok for ok, _ in done), sum(bad for _, bad in done)
    return clock.summary() | {
        "gc": gc_watch.summary(),
        "runs": ok + failed,
        "failed": failed,
        "steps_per_s": round(ok / clock.wall, 1),
        "cpu_us_per_step": round(clock.cpu / ok * 1e6, 1) if ok else None,
    }


async def _deliver(session: aiohttp.ClientSession, driver: str, url: str, refs: list[str]) -> int:
    """Have the sender deliver one signed webhook per ref to `url`; the number it delivered."""
    async with session.post(driver + "/go", json={"url": url, "refs": refs}) as resp:
        sent: int = (await resp.json())["sent"]
        return sent


async def hopwatch_webhooks(args: dict[str, Any]) -> dict[str, Any]:
    import monitor.runner

    issued = count()
    monitor.runner.new_run_id = lambda: f"{next(issued):016x}"  # known to the sender
    flow = webhook_flow()
    receiver = _time_receiver(args.get("time_handler", True))
    engine = build_engine([flow], max_concurrency=4 * args["batch"])
    await engine.start(schedule=False, admin=False)
    url = f"http://{engine.options.listen}{PATH}"

    async def batch(session: aiohttp.ClientSession, refs: list[str]) -> tuple[int, int]:
        runs = [asyncio.create_task(engine.runner.run(flow, "default")) for _ in refs]
        for _ in range(3):  # let every run register its expectation before anything is sent
            await asyncio.sleep(0)
        await _deliver(session, args["driver"], url, refs)
        results = await asyncio.gather(*runs)
        ok = sum(1 for res in results if res.outcome == "success")
        return ok, len(refs) - ok

    measured = await _drive_steady(args, batch, engine, receiver)
    outcomes = {
        outcome: engine.registry.get_sample_value(
            "hopwatch_arrivals_total", {"source": "webhook", "outcome": outcome}
        )
        for outcome in ("matched", "unmatched", "duplicate", "late", "bad_signature", "malformed")
    }
    return measured | {"arrivals": {k: int(v or 0) for k, v in outcomes.items()}}


async def hopwatch_receiver(args: dict[str, Any]) -> dict[str, Any]:
    """The receiver path alone: the same engine and deliveries as `hopwatch_webhooks`, but each
    batch's expectations are made waiting directly (as `webhook_await` leaves them) instead of
    by runs, so what is measured is aiohttp, the handler and the correlator's matching."""
    flow = webhook_flow()
    receiver = _time_receiver(args.get("time_handler", True))
    engine = build_engine([flow], max_concurrency=4 * args["batch"])
    await engine.start(schedule=False, admin=False)
    url = f"http://{engine.options.listen}{PATH}"
    correlator = engine.correlator

    async def batch(session: aiohttp.ClientSession, refs: list[str]) -> tuple[int, int]:
        deadline = time.monotonic() + 20.0
        waiting = [_waiting(correlator, ref, deadline) for ref in refs]
        await _deliver(session, args["driver"], url, refs)
        ok = sum(1 for expectation in waiting if expectation.state == "fulfilled")
        for expectation in waiting:
            expectation.cancel()  # any left unmatched: out of the pending table
        return ok, len(refs) - ok

    return await _drive_steady(args, batch, engine, receiver)


async def _drive_steady(
    args: dict[str, Any], batch: Batch, engine: Engine, receiver: list[float]
) -> dict[str, Any]:
    """`_drive` once the correlator is at its steady state (every later webhook pushes the
    oldest finished expectation out), then stop the engine; the rates and the receiver's time."""
    correlator = engine.correlator

    def steady() -> bool:
        return bool(correlator.stats()["finished"] >= correlator.max_late)

    try:
        rates = await _drive(args, batch, steady)
        finished = correlator.stats()["finished"]
    finally:
        await engine.stop()
    return rates | {
        "receiver_us": round(receiver[0] / receiver[1] * 1e6, 1) if receiver[1] else None,
        "pending_max": 2 * args["batch"],
        "finished_remembered": finished,
        "finished_max": correlator.max_late,
    }


def _waiting(correlator: Correlator, ref: str, deadline: float) -> Expectation:
    """An expectation in the state `Expectation.wait` leaves it in before it awaits: its
    matcher (the one `webhook_await` renders for `$.ref` = the run's correlation) indexed, with
    no future, timer or task behind it."""
    expectation = correlator.expect(PATH, ref, "hook", deadline)
    rule = Rule({}, {"$.ref": ref}, run_parts=frozenset({"json:$.ref"}))
    expectation.match = rule.matcher(header_value)
    correlator._start_waiting(expectation)
    expectation.state = "waiting"
    return expectation


def _time_receiver(on: bool = True) -> list[float]:
    """Time hopwatch's handling of a whole delivery (verify, parse, match, choose the answer:
    `_PathHandler.accept`, what runs between reading the request and writing the answer) as
    [seconds, calls]. It never waits, so its wall time is CPU time; it is the receiver's own
    share of a webhook, beside the HTTP server's and the run's (the rest). The wrapper's own
    cost, a call and two clock reads per webhook, counts against hopwatch; when not `on`
    (counting instructions), no wrapper and [0, 0]."""
    from monitor.receivers import webhooks as receiver

    spent = [0.0, 0.0]
    if not on:
        return spent
    accept = receiver._PathHandler.accept

    def timed(self: Any, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return accept(self, *args)
        finally:
            spent[0] += time.perf_counter() - started
            spent[1] += 1

    receiver._PathHandler.accept = timed  # type: ignore[method-assign,assignment]
    return spent


async def bare_aiohttp(args: dict[str, Any]) -> dict[str, Any]:
    """The same deliveries to a bare aiohttp server: one route, body read and parsed, 202; the
    collector settled as hopwatch settles its own (monitor.gc_settle), so the floor does not
    pay for collections that hopwatch is spared."""
    settle_start()

    async def receive(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post(PATH, receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        return await _drive_bare(args, port)
    finally:
        await runner.cleanup()


async def _drive_bare(args: dict[str, Any], port: int) -> dict[str, Any]:
    """`_drive` with deliveries alone (no run, no expectation) to a bare server on `port`."""
    url = f"http://127.0.0.1:{port}{PATH}"

    async def batch(session: aiohttp.ClientSession, refs: list[str]) -> tuple[int, int]:
        sent = await _deliver(session, args["driver"], url, refs)
        return sent, len(refs) - sent

    return await _drive(args, batch)


class _BareConnection(asyncio.Protocol):
    """A bare HTTP/1.1 server connection: httptools parses, the body's JSON is parsed, a fixed
    202 goes back. No limits, checks or timeouts: the floor under hopwatch's own connections
    (monitor/receivers/wire.py)."""

    ANSWER = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        json.loads(b"".join(self.body))
        self.body = []
        assert self.transport is not None
        self.transport.write(self.ANSWER)


async def bare_protocol(args: dict[str, Any]) -> dict[str, Any]:
    """The same deliveries to `_BareConnection`s, the collector settled as in `bare_aiohttp`."""
    settle_start()
    port = free_port()
    server = await asyncio.get_running_loop().create_server(_BareConnection, "127.0.0.1", port)
    try:
        return await _drive_bare(args, port)
    finally:
        server.close()


def part(ctx: Ctx) -> None:
    """Start the sender on the target's core, then measure hopwatch and the bare server on the
    monitor's core, once each per round (this VM's speed drifts; see throughput.part)."""
    port = free_port()
    sender = start_pinned(
        [sys.executable, "-m", "benchmarks.senders", "webhooks", "--port", str(port)],
        ctx.target_core,
    )
    batch = 100
    plan = [
        ("hopwatch", f"Standard Webhooks signature, JSON-path match, ≤ {2 * batch} runs waiting",
         "webhooks.hopwatch_webhooks", ctx.seconds(3.0, 8.0)),
        ("hopwatch receiver alone", f"the same, ≤ {2 * batch} expectations waiting, no run",
         "webhooks.hopwatch_receiver", ctx.seconds(3.0, 8.0)),
        ("bare aiohttp server", "one route: body read and JSON parsed, no signature, no run",
         "webhooks.bare_aiohttp", ctx.seconds(2.0, 4.0)),
        ("bare protocol server", "httptools in an asyncio protocol: body's JSON parsed, 202",
         "webhooks.bare_protocol", ctx.seconds(2.0, 4.0)),
    ]  # fmt: skip
    measured: list[list[dict[str, Any]]] = [[] for _ in plan]
    try:
        driver = f"http://127.0.0.1:{port}"
        wait_http(driver + "/ready")
        for n in range(2 if ctx.quick else 3):
            for (tool, _case, func, seconds), results in zip(plan, measured, strict=True):
                args = {"driver": driver, "batch": batch, "duration": seconds}
                result = ctx.child(func, args)
                results.append(result)
                ctx.log(
                    f"  round {n + 1}, {tool}: {result['steps_per_s']:,.0f}/s, "
                    f"{result['cpu_us_per_step']:,.0f} µs CPU each"
                )
    finally:
        stop_process(sender)
    rows = ctx.rows("webhooks")
    for (tool, case, _func, _seconds), results in zip(plan, measured, strict=True):
        rows.append({"tool": tool, "case": case, **median_round(results), "rounds": results})
