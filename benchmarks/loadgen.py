"""Load generation without hopwatch: open- and closed-loop request pacing and a JSON fetch, used
by the drivers of the side-by-side tools (which must not import the monitor)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp


async def fetch_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return await resp.json(content_type=None)


async def open_loop(
    rate: float, duration: float, fire: Callable[[int], Coroutine[Any, Any, None]]
) -> int:
    """Start `fire(i)` at `rate` per second for `duration` seconds regardless of how long each
    takes (open loop, as a scraper would); wait (bounded) for all; return how many started."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    start = loop.time()
    started = 0
    while True:
        elapsed = loop.time() - start
        due = min(int(elapsed * rate), int(duration * rate))
        while started < due:
            task = asyncio.create_task(fire(started))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            started += 1
        if elapsed >= duration:
            break
        await asyncio.sleep(0.001)
    if tasks:
        await asyncio.wait(tasks, timeout=15)
    return started


async def closed_loop(
    concurrency: int, duration: float, once: Callable[[], Awaitable[bool]]
) -> tuple[int, int]:
    """`concurrency` workers each calling `once()` back to back for `duration`: (ok, failed)."""
    ok = failed = 0
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal ok, failed
        while time.perf_counter() < deadline:
            if await once():
                ok += 1
            else:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, failed
