"""Scheduler: a hanging target never delays another flow, no overlap, clean shutdown, the grid
kept with missed ticks skipped, and no task per waiting flow."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from monitor.config import Config, Flow
from monitor.engine import Engine, Options
from monitor.results import RunResult
from monitor.scheduler import Scheduler
from tests.fixtures.core import serve
from tests.test_http import STARTED, target_app


class Collect:
    """A sink that records results and wakes waiters when a flow reaches a count."""

    def __init__(self) -> None:
        self.results: list[RunResult] = []
        self._waiters: list[tuple[str, int, asyncio.Event]] = []

    def submit(self, result: RunResult) -> None:
        self.results.append(result)
        for flow, count, event in self._waiters:
            if len(self.of(flow)) >= count:
                event.set()

    def of(self, flow: str) -> list[RunResult]:
        return [r for r in self.results if r.flow == flow]

    async def wait_for(self, flow: str, count: int, timeout: float = 10.0) -> None:
        event = asyncio.Event()
        self._waiters.append((flow, count, event))
        if len(self.of(flow)) >= count:
            event.set()
        await asyncio.wait_for(event.wait(), timeout)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@pytest.fixture
async def target() -> AsyncIterator[TestServer]:
    server = await serve(target_app())
    yield server
    await server.close()


def flows(base: str, *specs: tuple[str, str, str, str]) -> str:
    text = "flows:\n"
    for name, interval, timeout, path in specs:
        text += (
            f"  - name: {name}\n    interval: {interval}\n    timeout: {timeout}\n"
            f"    jitter: 0s\n    steps: [{{name: s, kind: http, url: '{base}{path}'}}]\n"
        )
    return text


async def start(config: Config, sink: Collect, grace: float = 5.0) -> Engine:
    engine = Engine(config, Options(grace=grace, extra_sinks=[sink]), CollectorRegistry())
    await engine.start(admin=False)
    return engine


async def test_hanging_target_does_not_delay_other_flows(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    base = f"http://127.0.0.1:{target.port}"
    config = load_flows(
        flows(base, ("stuck", "200ms", "3s", "/hang"), ("quick", "100ms", "1s", "/json"))
    )
    sink = Collect()
    engine = await start(config, sink, grace=0.1)
    try:
        await sink.wait_for("quick", 6, timeout=3.0)  # six runs while "stuck" hangs
        assert not sink.of("stuck")
        assert all(r.outcome == "success" for r in sink.of("quick"))
        runs = sink.of("quick")
        for earlier, later in itertools.pairwise(runs):  # never overlapping itself
            assert earlier.started_at + earlier.duration_s <= later.started_at + 1e-3
    finally:
        await engine.stop()


async def test_shutdown_lets_runs_finish_then_aborts_the_rest(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    base = f"http://127.0.0.1:{target.port}"
    config = load_flows(flows(base, ("stuck", "10s", "20s", "/hang")))
    sink = Collect()
    engine = await start(config, sink, grace=0.2)
    assert engine.scheduler is not None
    await asyncio.wait_for(target.app[STARTED].wait(), 5)
    await asyncio.wait_for(engine.stop(), 5)
    [result] = sink.results
    assert result.outcome == "aborted"
    assert result.steps[0].status == "aborted"
    registry = engine.registry
    labels = {"flow": "stuck", "variant": "default", "location": "local"}
    assert registry.get_sample_value("hopwatch_runs_total", {**labels, "outcome": "aborted"}) == 1
    assert registry.get_sample_value("hopwatch_flow_up", labels) is None  # not counted as failure


async def test_shutdown_grace_lets_a_slow_run_finish(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    base = f"http://127.0.0.1:{target.port}"
    config = load_flows(flows(base, ("slow", "10s", "5s", "/slow?ms=300")))
    sink = Collect()
    engine = await start(config, sink, grace=5.0)
    assert engine.scheduler is not None
    await asyncio.wait_for(target.app[STARTED].wait(), 5)
    await engine.stop()
    assert [r.outcome for r in sink.results] == ["success"]


class FakeRunner:
    """Records when each run starts and takes `seconds`: the scheduling logic alone."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.starts: list[tuple[str, float]] = []
        self.third = asyncio.Event()

    async def run(self, flow: Flow, variant: str) -> None:
        self.starts.append((flow.name, time.monotonic()))
        if len(self.starts) == 3:
            self.third.set()
        await asyncio.sleep(self.seconds)


def quick_flow(name: str, interval: str, jitter: str = "0s") -> Flow:
    step = {"name": "s", "kind": "http", "url": "http://127.0.0.1:9/"}
    return Flow.model_validate(
        {"name": name, "interval": interval, "jitter": jitter, "steps": [step]}
    )


async def test_an_overrunning_flow_keeps_its_grid_and_skips_missed_ticks() -> None:
    """Interval 100 ms, runs of 250 ms: the next runs start on the grid at 300 and 600 ms,
    not back to back at 250 and 500 ms (and never overlap)."""
    runner = FakeRunner(seconds=0.25)
    scheduler = Scheduler([quick_flow("slow", "100ms")], runner)
    scheduler.start()
    try:
        await asyncio.wait_for(runner.third.wait(), 5)
    finally:
        await scheduler.stop(grace=0.0)
    first, second, third = (t for _, t in runner.starts[:3])
    assert 0.29 <= second - first < 0.40
    assert 0.29 <= third - second < 0.40


async def test_waiting_flows_hold_no_task_each() -> None:
    """2,000 flows planned over the next 20 s: one heap entry each, tasks only for runs."""
    runner = FakeRunner()
    flows_ = [quick_flow(f"f{i}", "60s") for i in range(2000)]
    scheduler = Scheduler(flows_, runner)
    before = len(asyncio.all_tasks())
    scheduler.start()
    try:
        await asyncio.sleep(0)
        assert scheduler.waiting + len(runner.starts) >= 1990
        assert len(asyncio.all_tasks()) - before < 20
    finally:
        await scheduler.stop(grace=0.0)
    assert scheduler.waiting == 0


async def test_starts_that_take_the_budget_start_one_per_loop_iteration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop reads sockets only between iterations: 20 runs started in one iteration would
    run their first steps back to back while responses wait unstamped (benchmarks/fidelity.py:
    error p99 1.9-16 ms at 1,000 fresh checks/s, 1.0-2.8 ms one start per iteration). A run
    whose first step takes the whole budget starts alone."""
    monkeypatch.setattr("monitor.scheduler.FIRST_STARTS_PER_S", 1e9)  # all due at once
    monkeypatch.setattr("monitor.scheduler._BEHIND", 60.0)  # never behind: on schedule
    monkeypatch.setattr("monitor.scheduler.START_BUDGET_S", 0.001)
    assert await starts_by_iteration(12, first_step_s=0.002) == [1] * 12


async def test_the_runs_started_in_one_iteration_fit_the_start_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """First steps of 2 ms, a budget of 5 ms: two start per iteration once one was timed, never
    three (a busier machine only makes a start look dearer, so fewer start)."""
    monkeypatch.setattr("monitor.scheduler.FIRST_STARTS_PER_S", 1e9)
    monkeypatch.setattr("monitor.scheduler._BEHIND", 60.0)
    monkeypatch.setattr("monitor.scheduler.START_BUDGET_S", 0.005)
    starts = await starts_by_iteration(21, first_step_s=0.002)
    assert starts[0] == 1  # nothing timed yet
    assert max(starts) == 2
    assert starts.count(2) >= 5


async def test_behind_schedule_the_starts_get_the_longer_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A monitor that cannot keep up starts more per iteration (BEHIND_BUDGET_S): saturated,
    fuller iterations carry more checks per CPU-second."""
    monkeypatch.setattr("monitor.scheduler.FIRST_STARTS_PER_S", 1e9)
    monkeypatch.setattr("monitor.scheduler._BEHIND", -60.0)  # always behind
    monkeypatch.setattr("monitor.scheduler.START_BUDGET_S", 0.001)
    monkeypatch.setattr("monitor.scheduler.BEHIND_BUDGET_S", 0.007)
    starts = await starts_by_iteration(21, first_step_s=0.002)
    assert starts[0] == 1
    assert max(starts) == 3


async def test_cheap_starts_share_an_iteration_up_to_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Starts that cost next to nothing are amortised over one iteration, MAX_STARTS at most:
    saturated, fewer and fuller iterations are what a scheduled check's CPU was spent on."""
    monkeypatch.setattr("monitor.scheduler.FIRST_STARTS_PER_S", 1e9)
    monkeypatch.setattr("monitor.scheduler.START_BUDGET_S", 1.0)
    monkeypatch.setattr("monitor.scheduler.BEHIND_BUDGET_S", 1.0)
    monkeypatch.setattr("monitor.scheduler.MAX_STARTS", 8)
    assert await starts_by_iteration(40) == [1, 8, 8, 8, 8, 7]


async def starts_by_iteration(n: int, first_step_s: float = 0.0) -> list[int]:
    """How many of `n` runs, all due at once, started in each loop iteration (each run's first
    step busy for `first_step_s`, as building a request and connecting keep the loop busy)."""
    loop = asyncio.get_running_loop()
    iteration = itertools.count()
    now = [0]

    def tick() -> None:  # one call per loop iteration
        now[0] = next(iteration)
        ticker[0] = loop.call_soon(tick)

    ticker = [loop.call_soon(tick)]
    at: list[int] = []
    all_started = asyncio.Event()

    class Runner(FakeRunner):
        async def run(self, flow: Flow, variant: str) -> None:
            at.append(now[0])
            if len(at) == n:
                all_started.set()
            busy_until = time.monotonic() + first_step_s
            while time.monotonic() < busy_until:
                pass
            await super().run(flow, variant)

    scheduler = Scheduler([quick_flow(f"f{i}", "60s") for i in range(n)], Runner())
    scheduler.start()
    try:
        await asyncio.wait_for(all_started.wait(), 5)
    finally:
        ticker[0].cancel()
        await scheduler.stop(grace=0.0)
    return [at.count(i) for i in sorted(set(at))]
