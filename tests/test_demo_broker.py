"""The demo's broker launcher knows its own process: a taken port is an error, not a broker
that "answers", and the broker dies with the process that started it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.demo.broker import BrokerError, TansuBroker

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parent.parent  # the child imports this worktree's monitor

_CHILD = """
import asyncio, sys
from monitor.demo.broker import TansuBroker

async def main():
    broker = TansuBroker()
    await broker.start()
    print(broker.pid, flush=True)
    sys.stdin.read()  # until the test kills us

asyncio.run(main())
"""


async def test_a_port_held_by_another_broker_is_an_error(own_kafka_broker: TansuBroker) -> None:
    second = TansuBroker(own_kafka_broker.port)
    with pytest.raises(BrokerError, match="taken by another process"):
        await second.start()
    assert not second.running
    second.close_log()
    assert own_kafka_broker.running


async def test_a_port_held_by_a_plain_listener_is_an_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        broker = TansuBroker(holder.getsockname()[1])
        with pytest.raises(BrokerError, match="taken by another process"):
            await broker.start()
        broker.close_log()


async def wait_gone(pid: int, within: float) -> None:
    """Return when process `pid` (not our child) has exited: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, gone.set)
    try:
        async with asyncio.timeout(within):
            await gone.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="Linux only: PR_SET_PDEATHSIG")
async def test_the_broker_dies_with_its_parent() -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        broker_pid = int(line)
        os.kill(child.pid, signal.SIGKILL)  # as a killed demo: no cleanup runs
        await wait_gone(broker_pid, within=10)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()


def test_a_broker_outlives_the_event_loop_that_started_it() -> None:
    """The session's broker is started in one asyncio.run and used from others: its death
    signal must follow the process, not a thread (a fork from an executor thread was killed
    when the loop shut its executor down)."""
    broker = TansuBroker()
    asyncio.run(broker.start())
    try:
        assert broker._proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            broker._proc.wait(1.0)
        assert broker.running, broker.output()
    finally:
        asyncio.run(broker.stop())
        broker.close_log()
