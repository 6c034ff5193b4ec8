"""A TLS handshake of our own to read a server's leaf certificate, for kinds whose client
library hides the peer certificate (grpcio does).

When: at most once per (host, port, TLS settings, server name) every `PEEK_TTL` seconds, and
only one at a time per target (concurrent runs wait for the one handshake). A certificate is a
matter of days, so a run every few seconds need not open a connection more than the call's;
`PEEK_TTL` bounds how stale the figure is: a rotated certificate shows within 5 minutes.

Why not the call's own connection: a gRPC channel keeps its connection for hours, so the
certificate it was handshaked with is not the one a new client gets today. The peek is a new
connection, with the step's TLS settings (CA, client certificate, server name for SNI and
verification), so it sees what a new client would see.

A failed peek is never cached (the next run tries again) and becomes a `StepFailed` named for
what failed (`tls_error`, `connect_error`, `timeout`); the kind decides what that means for its
step.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from probes.errors import ConnectError, Timeout, TlsError, drop_frames, os_reason
from probes.http_common import TlsConfig, build_ssl_context
from probes.tls_cert import not_after

PEEK_TTL: Final = 300.0  # seconds a peeked expiry is reused; a rotated certificate shows after
MAX_TARGETS: Final = 1024  # distinct targets remembered (the oldest is forgotten first)

_Key = tuple[str, int, TlsConfig, str]


@dataclass(frozen=True, slots=True)
class _Seen:
    at: float  # monotonic
    expiry: float | None


class LeafExpiries:
    """The leaf certificates' notAfter per target, peeked by a handshake and kept `ttl` s."""

    def __init__(self, ttl: float = PEEK_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self.clock = clock  # monotonic seconds; a test moves it on
        self._seen: dict[_Key, _Seen] = {}
        self._locks: dict[_Key, asyncio.Lock] = {}
        self._contexts: dict[TlsConfig, ssl.SSLContext] = {}
        self.handshakes = 0  # peeks made (not cache hits): how often a target is connected to

    async def not_after(
        self, host: str, port: int, tls: TlsConfig, server_name: str, timeout: float
    ) -> float | None:
        """The leaf's notAfter (unix seconds), fresh within the TTL; StepFailed when the
        handshake fails or takes over `timeout` seconds."""
        key = (host, port, tls, server_name)
        seen = self._fresh(key)
        if seen is not None:
            return seen.expiry
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with asyncio.timeout(timeout):
                async with lock:
                    seen = self._fresh(key)  # another run peeked while this one waited
                    if seen is not None:
                        return seen.expiry
                    expiry = await self._peek(host, port, tls, server_name)
        except TimeoutError:
            raise Timeout(f"no TLS handshake with {host}:{port} in time") from None
        self._seen.pop(key, None)
        self._seen[key] = _Seen(self.clock(), expiry)
        while len(self._seen) > MAX_TARGETS:
            del self._seen[next(iter(self._seen))]
        if len(self._locks) > MAX_TARGETS:  # idle locks of forgotten targets
            idle = [k for k, v in self._locks.items() if k not in self._seen and not v.locked()]
            for old in idle:
                del self._locks[old]
        return expiry

    def _fresh(self, key: _Key) -> _Seen | None:
        seen = self._seen.get(key)
        if seen is not None and self.clock() - seen.at < self._ttl:
            return seen
        return None

    async def _peek(self, host: str, port: int, tls: TlsConfig, server_name: str) -> float | None:
        context = self._contexts.get(tls)
        if context is None:
            context = self._contexts[tls] = build_ssl_context(tls)
        self.handshakes += 1
        where = f"{host}:{port}"
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            drop_frames(exc)
            raise ConnectError(f"cannot connect to {where}: {os_reason(exc)}") from exc
        try:
            await writer.start_tls(context, server_hostname=server_name)
            return not_after(writer.get_extra_info("ssl_object"))
        except (OSError, ssl.SSLError) as exc:  # connected: whatever breaks now is the TLS's
            drop_frames(exc)
            said = str(exc) or "the server closed the connection during the handshake"
            raise TlsError(f"TLS to {where}: {said}") from exc
        finally:
            writer.close()
