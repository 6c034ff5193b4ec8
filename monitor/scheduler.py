"""Runs every (flow, variant) on its interval: never overlapping itself, spread by jitter, capped.

A waiting (flow, variant) is one entry in a heap under a single loop timer; a task exists only
while its run is due or running. A sleeping task per flow cost eight garbage-collected objects
(task, coroutine, future, timer handle…) that lived a whole interval each: at 10,000 flows,
80,000 objects that every full collection walked (45 ms pauses, measured), and a timer and a
future more per run. Each run still is its own task, so a hanging target delays only its own
flow; the global semaphore caps runs in flight. A (flow, variant) is planned again only when its
run ended (no overlap). Ticks stay on a fixed grid (jitter does not drift), and ticks missed
while a run overran are skipped rather than run back to back.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import random
import time
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from monitor.config import Flow
from monitor.metrics import Metrics
from monitor.runner import Runner

log = logging.getLogger(__name__)

FIRST_STARTS_PER_S = 100.0
_EARLY = 0.001  # the loop's timers have millisecond resolution: start what is due within it
# The runs started in one loop iteration may take this long to their first wait (see
# Scheduler._fire): on schedule about one fresh-connection start on this project's machine;
# once the earliest due run is more than _BEHIND late, the longer BEHIND_BUDGET_S.
START_BUDGET_S = 0.0003
BEHIND_BUDGET_S = 0.001
_BEHIND = 0.005
MAX_STARTS = 32
_COST_WEIGHT = 0.25  # of the newest batch in the running estimate of a start's cost


@dataclass(slots=True)
class _Slot:
    """One (flow, variant): where it stands on its grid and when its next run is planned."""

    flow: Flow
    variant: str
    tick: float  # monotonic grid point of the next run
    planned: float  # tick plus this round's jitter
    task: asyncio.Task[None] | None = None  # its run, while one is due or running
    removed: bool = False  # no longer scheduled here (another replica owns it now)
    name: str = ""  # its runs' task name

    def __post_init__(self) -> None:
        self.name = f"{self.flow.name}/{self.variant}"


class Scheduler:
    def __init__(
        self,
        flows: Sequence[Flow],
        runner: Runner,
        *,
        max_concurrency: int = 256,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.flows = list(flows)
        self.runner = runner
        self.metrics = metrics
        self._sem = asyncio.Semaphore(max_concurrency)
        self._rng = rng or random.Random()
        self._heap: list[tuple[float, int, _Slot]] = []
        self._seq = 0  # ties in the heap resolve in planning order, never by comparing slots
        self._timer: asyncio.Handle | None = None
        self._timer_at = math.inf
        # The running loop, found once (start, add): asyncio.get_running_loop() asks the kernel
        # for the pid on every call in Python 3.11, several times a run.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[asyncio.Task[None], bool] = {}  # task → running a run now
        self._stopping = False
        self._hurry = asyncio.Event()  # set by a second SIGTERM: the grace is over now
        # What starting a run costs the loop (its task's first step): measured on every batch
        # of starts (a running estimate); until the first is measured, one start at a time.
        self.start_cost = math.inf
        self._batch_began = 0.0
        # Built here, so that an engine freezing its start-up objects out of the GC freezes
        # these too; planned by start().
        self._slots = [_Slot(f, v, 0.0, 0.0) for f in self.flows for v in f.variants]

    def start(self) -> None:
        # First runs spread over the jitter, widened so that all flows together start at most
        # FIRST_STARTS_PER_S on average (up to the whole interval, as Prometheus spreads
        # scrapes): a few flows report at once, 10,000 never start in one burst.
        window = len(self._slots) / FIRST_STARTS_PER_S
        uniform = self._rng.uniform
        offsets = [
            uniform(0, min(max(s.flow.spread, window), s.flow.interval)) for s in self._slots
        ]
        now = time.monotonic()  # after the draws: 10,000 of them take milliseconds
        for slot, offset in zip(self._slots, offsets, strict=True):
            slot.tick = slot.planned = now + offset
        self._loop = asyncio.get_running_loop()
        self._heap = [(slot.planned, i, slot) for i, slot in enumerate(self._slots)]
        self._seq = len(self._heap)
        heapq.heapify(self._heap)
        self._arm()

    def add(self, flows: Sequence[Flow]) -> None:
        """Schedule more flows from now on, each on its wall-clock grid: a phase drawn from its
        name, so a flow that moves between replicas keeps its rhythm (no burst of catch-up
        runs, no long gap) and every replica would place it alike."""
        self._loop = asyncio.get_running_loop()
        now, now_unix = time.monotonic(), time.time()
        for flow in flows:
            phase = (zlib.crc32(flow.name.encode()) / 2**32) * flow.interval
            tick = now + (phase - now_unix) % flow.interval
            for variant in flow.variants:
                slot = _Slot(flow, variant, tick, tick + self._rng.uniform(0, flow.spread))
                self._slots.append(slot)
                self._push(slot)
        self._arm()

    async def remove(self, names: Collection[str]) -> None:
        """Stop scheduling these flows now: runs in flight are cancelled (they end `aborted`)
        and awaited, so that when this returns none of them is running here."""
        gone = [s for s in self._slots if s.flow.name in names]
        for slot in gone:
            slot.removed = True
        self._slots = [s for s in self._slots if not s.removed]
        self._heap = [entry for entry in self._heap if not entry[2].removed]
        heapq.heapify(self._heap)
        tasks = [s.task for s in gone if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _push(self, slot: _Slot) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (slot.planned, self._seq, slot))

    def _arm(self) -> None:
        """Keep one loop timer set for the earliest planned run."""
        if self._stopping or not self._heap:
            return
        due = self._heap[0][0]
        if due >= self._timer_at:
            return  # the timer already set fires first
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop or asyncio.get_running_loop()
        wait = due - time.monotonic()
        # Already due: the next iteration, without a timer (a libuv timer handle each, in uvloop)
        self._timer = (
            loop.call_soon(self._fire)
            if wait <= 0
            else loop.call_at(loop.time() + wait, self._fire)
        )
        self._timer_at = due

    def _fire(self) -> None:
        """Start the earliest due runs, as many as fit START_BUDGET_S; `_arm` sets the timer
        again at once if more are due.

        A task's first step (building the request, connecting) runs in the loop iteration after
        its start, and the loop reads sockets only between iterations: a response that arrives
        meanwhile is stamped late. Starting every run that falls due together (3-9 at 1,000
        checks/s) made iterations of a few milliseconds: error p99 1.9-16 ms with fresh
        connections, 1.2-1.5 ms reused; one start per iteration, 1.0-2.8 and 0.8-1.1 ms
        (benchmarks/fidelity.py, alternated runs), but at the price of more, shorter iterations:
        saturated, a fresh-connection check cost 400-470 µs of CPU against 320-330 µs
        starting every due run at once. So the starts of one iteration are bounded by the time
        they take, not by their number: each batch's first steps are timed (a callback before
        and one after them, FIFO), and the next batch is as many as the running estimate of a
        start's cost fits in START_BUDGET_S (at least one, at most MAX_STARTS). Behind schedule
        (the earliest due run over _BEHIND late), the budget is BEHIND_BUDGET_S: saturated,
        fewer and fuller iterations carry more checks per CPU-second (alternated runs, see the
        README's Performance section), and the error's tail then follows that budget."""
        self._timer, self._timer_at = None, math.inf
        heap = self._heap
        now = time.monotonic()
        if heap and heap[0][0] <= now + _EARLY:
            budget = BEHIND_BUDGET_S if heap[0][0] < now - _BEHIND else START_BUDGET_S
            fit = budget / self.start_cost
            allowed = MAX_STARTS if fit >= MAX_STARTS else max(1, int(fit))
            loop = self._loop or asyncio.get_running_loop()
            create_task, forget, tasks = loop.create_task, self._forget, self._tasks
            loop.call_soon(self._began)
            started = 0
            while started < allowed and heap and heap[0][0] <= now + _EARLY:
                started += 1
                slot = heapq.heappop(heap)[2]
                task = slot.task = create_task(self._run(slot), name=slot.name)
                tasks[task] = False
                task.add_done_callback(forget)
            loop.call_soon(self._ended, started)
        self._arm()

    def _began(self) -> None:
        self._batch_began = time.monotonic()

    def _ended(self, started: int) -> None:
        """The batch's first steps are done: update the estimate of a start's cost."""
        cost = max(time.monotonic() - self._batch_began, 1e-9) / started
        if self.start_cost == math.inf:
            self.start_cost = cost
        else:
            self.start_cost += (cost - self.start_cost) * _COST_WEIGHT

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _run(self, slot: _Slot) -> None:
        task = slot.task  # set by _fire as it made this task (current_task() costs a getpid)
        assert task is not None
        async with self._sem:
            if self.metrics is not None:
                self.metrics.scheduler_lag.observe(max(0.0, time.monotonic() - slot.planned))
            self._tasks[task] = True
            try:
                await self.runner.run(slot.flow, slot.variant)
            except asyncio.CancelledError:
                raise
            except Exception:  # the runner already reported; keep the schedule alive
                log.exception("run of %s/%s raised", slot.flow.name, slot.variant)
            finally:
                self._tasks[task] = False
        slot.task = None
        if not self._stopping and not slot.removed:
            self._plan_next(slot)
            self._arm()

    def _plan_next(self, slot: _Slot) -> None:
        flow = slot.flow
        slot.tick += flow.interval
        now = time.monotonic()
        # Skip ticks whose whole jitter window passed while the run overran; a run that is
        # merely late (inside its window) still happens, right away.
        if slot.tick + flow.spread < now:
            missed = math.ceil((now - slot.tick - flow.spread) / flow.interval)
            slot.tick += missed * flow.interval
        slot.planned = max(slot.tick + self._rng.uniform(0, flow.spread), now)
        self._push(slot)

    @property
    def waiting(self) -> int:
        """(flow, variant) pairs planned and not yet started."""
        return len(self._heap)

    async def stop(self, grace: float = 10.0) -> None:
        """Start nothing more; let in-flight runs finish within `grace`; then cancel them
        (they end as aborted). Runs still queued for the semaphore are cancelled at once."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        self._heap.clear()
        for task, running in list(self._tasks.items()):
            if not running:
                task.cancel()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await self._graced(pending, grace)
            still = [t for t in pending if not t.done()]
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)
        self._tasks.clear()

    def hurry(self) -> None:
        """End the shutdown grace now (or at once, if stop() has not begun): in-flight runs
        are cancelled and recorded as aborted, as when the grace runs out."""
        self._hurry.set()

    async def _graced(self, pending: list[asyncio.Task[None]], grace: float) -> None:
        """Wait until `pending` are done, the grace is over, or hurry() is called."""
        finished = asyncio.ensure_future(asyncio.wait(pending))
        hurried = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait({finished, hurried}, timeout=grace, return_when="FIRST_COMPLETED")
        finally:
            for waiter in (finished, hurried):
                waiter.cancel()
            await asyncio.gather(finished, hurried, return_exceptions=True)
