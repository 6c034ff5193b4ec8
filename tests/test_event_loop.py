"""hopwatch's event loop: uvloop, connecting to an IP address without libuv's thread pool."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from monitor.event_loop import Loop
from monitor.lifecycle import run_async


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


def no_resolving(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Make uvloop's getaddrinfo (the thread-pool path) record its calls and fail."""
    asked: list[Any] = []

    async def refuse(self: Loop, *args: Any, **kwargs: Any) -> Any:
        asked.append(args)
        raise OSError("getaddrinfo was asked")

    monkeypatch.setattr(Loop, "getaddrinfo", refuse)
    return asked


def connect(address: Any, peer: Any = None) -> None:
    """Connect a socket to `address` through Loop.sock_connect; it must reach `peer`."""

    async def main() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
            assert sock.getpeername() == (peer or address)
        finally:
            sock.close()

    loop = Loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_connect_to_an_ip_asks_no_resolver(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop's own sock_connect sends every address through getaddrinfo in its thread pool."""
    asked = no_resolving(monkeypatch)
    connect(listener.getsockname())
    assert asked == []


def test_a_refused_connect_is_an_oserror_with_its_errno(monkeypatch: pytest.MonkeyPatch) -> None:
    no_resolving(monkeypatch)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    with pytest.raises(ConnectionRefusedError) as refused:
        connect(("127.0.0.1", port))
    assert refused.value.errno == errno.ECONNREFUSED


def test_a_name_is_still_resolved_by_uvloop(listener: socket.socket) -> None:
    """Anything but an IP address goes the way uvloop goes (the name resolved, then connected)."""
    port = listener.getsockname()[1]
    connect(("localhost", port), peer=("127.0.0.1", port))


def test_commands_run_on_this_loop() -> None:
    async def which() -> type:
        return type(asyncio.get_running_loop())

    assert run_async(which()) is Loop
