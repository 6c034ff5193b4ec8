"""The runner's per-step timeout: asyncio.timeout's rules, with one loop timer for all steps.

Every step of every run gets a budget, and nearly every step ends well inside it: a loop
timer made and cancelled per step (uvloop: a TimerHandle and a libuv handle allocated,
started, stopped, closed on the next turn and freed) was ~2 % of a webhook-awaiting run's
instructions. Here the deadlines of a loop's steps sit in one heap under one loop timer set
for the earliest; a step that ends only marks its entry closed, and closed entries are
dropped when they come first or when they outnumber the rest (as the correlator's
expectations, monitor/correlator).
"""

from __future__ import annotations

import asyncio
import math
import time
from heapq import heapify, heappop, heappush
from typing import Any, Final

_COMPACT_SLACK: Final = 64  # closed entries tolerated beyond as many as there are open ones
_OPEN, _CLOSED, _EXPIRED = 0, 1, 2


class StepTimeout:
    """`asyncio.timeout` for one step: the same rules (at the deadline the task is cancelled;
    on the way out its CancelledError becomes TimeoutError, unless someone else cancelled the
    task too, e.g. shutdown), without the two coroutines and the state machine that made
    asyncio's version 5 % of a reused-connection check's instructions (callgrind, Python
    3.11), nor a loop timer of its own.

    `with StepTimeout(budget):`, or, as the runner does it (no `__init__`, `__enter__` and
    `__exit__` calls per step), `timeout = step_timeout(task, deadline)` and then
    `timeout.close(error)` once the step is over, with the exception it raised or None."""

    __slots__ = ("_cancelling", "_state", "_task")

    _cancelling: int
    _state: int
    _task: asyncio.Task[Any]

    def __new__(cls, budget: float) -> StepTimeout:
        return step_timeout(asyncio.current_task(), time.monotonic() + budget)

    def __lt__(self, other: StepTimeout) -> bool:
        return id(self) < id(other)  # two equal deadlines in the heap: any order will do

    def _expire(self) -> None:
        self._state = _EXPIRED
        self._task.cancel()

    def close(self, error: BaseException | None) -> None:
        """The step is over, having raised `error` (None: it returned); raises TimeoutError in
        place of the CancelledError its deadline caused."""
        expired = self._state == _EXPIRED
        self._state = _CLOSED
        if (
            expired
            and self._task.uncancel() <= self._cancelling
            and type(error) is asyncio.CancelledError
        ):
            raise TimeoutError

    def __enter__(self) -> StepTimeout:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, error: BaseException | None, _: object
    ) -> None:
        self.close(error)


_new_timeout = object.__new__


def step_timeout(task: asyncio.Task[Any] | None, at: float) -> StepTimeout:
    """Cut `task` at `at` (time.monotonic) unless the returned timeout is closed by then."""
    if task is None:
        raise RuntimeError("a step timeout outside a task")
    timeout: StepTimeout = _new_timeout(StepTimeout)
    timeout._task = task
    timeout._cancelling = task.cancelling()
    timeout._state = _OPEN
    # the task's own loop: asyncio.get_running_loop() asks the kernel for the pid (3.11)
    loop = task.get_loop()
    keeper = _keepers.get(loop)
    if keeper is None:
        keeper = _keeper(loop)
    heap = keeper.heap
    if len(heap) > keeper.limit:
        keeper.compact()
    heappush(heap, (at, timeout))
    if at < keeper.timer_at:
        keeper.arm(at)
    return timeout


class StepDeadlines:
    """The deadlines of one loop's steps: a heap of (time.monotonic, StepTimeout) under one
    loop timer set for the earliest."""

    __slots__ = ("heap", "limit", "loop", "timer", "timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list[tuple[float, StepTimeout]] = []
        self.limit = _COMPACT_SLACK  # compact the heap when it holds more entries than this
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf

    def compact(self) -> None:
        """Drop the closed entries."""
        heap = self.heap
        heap[:] = [entry for entry in heap if entry[1]._state == _OPEN]
        heapify(heap)
        self.limit = 2 * len(heap) + _COMPACT_SLACK

    def arm(self, at: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = at
        self.timer = self.loop.call_later(max(0.0, at - time.monotonic()), self._fire)

    def _fire(self) -> None:
        """The timer's callback: expire the open steps that are due, drop closed entries, and
        set the timer for the next open one (again if the loop's clock woke it a little
        early)."""
        self.timer, self.timer_at = None, math.inf
        now = time.monotonic()
        heap = self.heap
        while heap:
            at, timeout = heap[0]
            if timeout._state == _OPEN and at > now:
                self.arm(at)
                return
            heappop(heap)
            if timeout._state == _OPEN:
                timeout._expire()


_keepers: dict[asyncio.AbstractEventLoop, StepDeadlines] = {}


def _keeper(loop: asyncio.AbstractEventLoop) -> StepDeadlines:
    """A new loop's deadlines; those of closed loops go (tests run a loop each)."""
    for old in list(_keepers):
        if old.is_closed():
            del _keepers[old]
    keeper = _keepers[loop] = StepDeadlines(loop)
    return keeper


def step_deadlines(loop: asyncio.AbstractEventLoop) -> StepDeadlines | None:
    """`loop`'s deadlines, if a step has run on it (for tests)."""
    return _keepers.get(loop)
