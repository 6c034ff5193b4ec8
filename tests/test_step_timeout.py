"""The runner's per-step timeout keeps asyncio.timeout's rules (it replaced it for cost)."""

from __future__ import annotations

import asyncio

import pytest

from monitor.runner import StepTimeout


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
