"""The runner's per-step timeout keeps asyncio.timeout's rules (it replaced it for cost)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from monitor.step_timeout import StepTimeout, step_deadlines


async def test_expiry_becomes_timeout_error_and_leaves_the_task_uncancelled() -> None:
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(TimeoutError), StepTimeout(0.01):
        await asyncio.Event().wait()  # never set: only the timer ends it
    assert task.cancelling() == 0
    await asyncio.sleep(0)  # nothing left pending would cancel this task now


async def test_a_step_done_in_time_is_never_cancelled_later() -> None:
    with StepTimeout(0.02):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)  # past the budget: the timer was stopped on the way out


async def test_a_cancel_from_outside_stays_a_cancel() -> None:
    entered = asyncio.Event()

    async def step() -> None:
        with StepTimeout(10):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(step())
    await entered.wait()
    task.cancel()  # shutdown, not the step's budget
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_shutdown_during_expiry_is_not_reported_as_a_timeout() -> None:
    """The budget passed and the monitor is stopping in the same turn: the run is aborted,
    as asyncio.timeout decides, not failed with `timeout`."""
    entered = asyncio.Event()
    timeout: list[StepTimeout] = []

    async def step() -> None:
        with StepTimeout(10) as deadline:
            timeout.append(deadline)
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(step())
    await entered.wait()
    timeout[0]._expire()  # the timer fires…
    task.cancel()  # …and shutdown cancels too
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_shorter_budget_after_longer_ones_still_cuts_at_its_own_deadline() -> None:
    """One loop timer serves every step, set for the earliest deadline: a step whose deadline
    comes before the open ones' must move it forward."""
    entered = asyncio.Event()

    async def long_step() -> None:
        with StepTimeout(30):
            entered.set()
            await asyncio.Event().wait()

    other = asyncio.create_task(long_step())
    await entered.wait()
    started = time.monotonic()
    with pytest.raises(TimeoutError), StepTimeout(0.05):
        await asyncio.Event().wait()
    assert 0.04 <= time.monotonic() - started < 1.0
    assert not other.done()  # its own deadline is far off
    other.cancel()
    with pytest.raises(asyncio.CancelledError):
        await other


async def test_steps_expire_in_deadline_order_each_at_its_own_time() -> None:
    cut: dict[float, float] = {}
    started = time.monotonic()

    async def step(budget: float) -> None:
        with contextlib.suppress(TimeoutError), StepTimeout(budget):
            await asyncio.Event().wait()
        cut[budget] = time.monotonic() - started

    await asyncio.gather(*(step(budget) for budget in (0.15, 0.05, 0.1)))
    assert sorted(cut, key=cut.__getitem__) == [0.05, 0.1, 0.15]
    for budget, after in cut.items():
        assert budget - 0.005 <= after < budget + 0.5


async def test_finished_steps_leave_no_pile_of_deadlines() -> None:
    """A step that ends in time only marks its entry done; done entries are dropped when they
    outnumber the open ones, so a long budget per step does not grow the heap per run."""
    for _ in range(2000):
        with StepTimeout(60):
            await asyncio.sleep(0)
    keeper = step_deadlines(asyncio.get_running_loop())
    assert keeper is not None
    assert len(keeper.heap) <= 200
