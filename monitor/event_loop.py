"""The event loop hopwatch runs on: uvloop, with a connect that skips a needless thread hop.

uvloop's `sock_connect` resolves every address with `getaddrinfo` in libuv's thread pool, even
an address that is already an IP (it asks without a socket type, which its own fast path for
numeric hosts does not take). The http kinds' clients connect every new connection through
`sock_connect` (aiohappyeyeballs), after resolving the name themselves, so each fresh-connection
check paid a worker thread's wake-up, a second wake-up of the loop and two context switches for
nothing.
`Loop.sock_connect` connects a socket to a numeric address itself, as asyncio's own loop does,
and leaves anything else to uvloop.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import uvloop

from probes.http_common import socket_family

__all__ = ["Loop", "new_event_loop"]

_INET = (socket.AF_INET, socket.AF_INET6)
_IN_PROGRESS = (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR)


class Loop(uvloop.Loop):
    """uvloop's loop; `sock_connect` to an IP address without the thread pool."""

    async def sock_connect(self, sock: socket.socket, address: Any) -> None:
        family = socket_family(sock)
        if family not in _INET or not _numeric(family, address):
            return await super().sock_connect(sock, address)
        # connect_ex: a connect in progress (the usual answer) is not raised and caught
        err = sock.connect_ex(address)
        if err == 0:
            return  # made at once
        if err not in _IN_PROGRESS:
            raise OSError(err, f"Connect call failed {address}")
        fd = sock.fileno()
        ready = self.create_future()
        self.add_writer(fd, _wake, ready)
        try:
            await ready
        finally:
            self.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"Connect call failed {address}")


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _numeric(family: int, address: Any) -> bool:
    """Whether `address` is (IP, port, ...) already: nothing for getaddrinfo to resolve."""
    if not isinstance(address, tuple) or len(address) < 2 or not isinstance(address[0], str):
        return False
    try:
        socket.inet_pton(family, address[0])
    except OSError:
        return False
    return isinstance(address[1], int)


def new_event_loop() -> Loop:
    return Loop()
