"""An engine's life under a command (event loop, start-up errors, stop on a signal), shared by
the CLI and the demo so that neither imports the other."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import typer

from monitor.config import Config
from monitor.engine import Engine, Options
from probes.errors import ConfigError

__all__ = ["engine_or_exit", "exit_with", "run_async", "serve_until_signal", "wait_for_signal"]

T = TypeVar("T")
log = logging.getLogger(__name__)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on uvloop where available (cheaper I/O on the hot path; `monitor.event_loop`),
    else asyncio's loop."""
    try:
        import uvloop

        from monitor.event_loop import new_event_loop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(coro)
    return uvloop.run(coro, loop_factory=new_event_loop)


def exit_with(problems: list[str]) -> NoReturn:
    """Print each problem on its own line to stderr and exit 2 (the caller's setup is wrong)."""
    for problem in problems:
        sys.stderr.write(problem + "\n")
    raise typer.Exit(2)


def engine_or_exit(config: Config, options: Options) -> Engine:
    """An Engine, or exit 2 when the environment's settings (OTEL_*) cannot be honoured."""
    try:
        return Engine(config, options)
    except ConfigError as exc:
        exit_with(exc.problems)


async def wait_for_signal(duration: float | None = None) -> None:
    """Return on SIGINT/SIGTERM, or after `duration` seconds when given."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), duration)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def serve_until_signal(engine: Engine, duration: float | None = None) -> None:
    """Run the engine until SIGINT/SIGTERM (or `duration` seconds), then stop gracefully;
    SIGHUP reloads the flow files meanwhile."""
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[Any]] = set()
    reloader = engine.reloader
    if reloader is not None:

        def reload() -> None:
            task = loop.create_task(reloader.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await wait_for_signal(duration)
    finally:
        if reloader is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        if reloads:
            await asyncio.wait(reloads)
        await _stop_hurried_by_signal(engine)


async def _stop_hurried_by_signal(engine: Engine) -> None:
    """Stop the engine; a signal during the grace (a second SIGTERM, Ctrl-C again) ends the
    grace at once instead of killing the process, so in-flight runs are recorded as aborted
    and what the sinks hold is written before exit."""
    loop = asyncio.get_running_loop()

    def hurry() -> None:
        log.warning("signalled again: aborting the runs in flight now")
        engine.hurry()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, hurry)
    try:
        await engine.stop()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
