"""HTTP sessions lent to probes: fresh connections per run by default, kept across runs on request.

What is costly to build (SSL contexts, the resolver) is built once and shared; what makes a run
look like a new client (DNS lookup, TCP and TLS handshakes) is done per run unless the flow
opts into `reuse_connections`. A run that sends one request in all takes its new connection
from a shared session that closes every connection after its response: the same handshakes,
without a session built and closed per run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import Any

import aiohttp

from probes.base import StepContext
from probes.http_common import TimedConnector, TimedResolver, TlsConfig, build_ssl_context

_CLOSERS = "_http_sessions"


class HttpClientPool:
    """Implements probes.base.HttpClients for the engine."""

    def __init__(self) -> None:
        self._resolver = TimedResolver()
        self._ssl: dict[TlsConfig, Any] = {}
        # (TLS settings, connections closed after each response) → session shared by runs
        self._shared: dict[tuple[TlsConfig, bool], aiohttp.ClientSession] = {}
        # Step configs are frozen and live as long as the engine: a shared session is found
        # by the TlsConfig object's identity first (hashing a pydantic model costs more than
        # the rest of the lookup), by value when a config comes new.
        self._by_id: dict[tuple[int, bool], tuple[TlsConfig, aiohttp.ClientSession]] = {}
        self._timeout = aiohttp.ClientTimeout(total=None)  # the runner owns time

    def prepare(self, configs: Iterable[TlsConfig]) -> None:
        """Build the SSL contexts up front: loading the system CAs takes tens of milliseconds,
        which the first run would otherwise spend blocking the loop (and every run's timing)."""
        for tls in configs:
            self._ssl_for(tls)

    def _ssl_for(self, tls: TlsConfig) -> Any:
        ctx = self._ssl.get(tls)
        if ctx is None:
            ctx = self._ssl[tls] = build_ssl_context(tls)
        return ctx

    def _new_session(
        self, tls: TlsConfig, *, shared: bool, closing: bool = False, cookies: bool = False
    ) -> aiohttp.ClientSession:
        connector = TimedConnector(
            ssl=self._ssl_for(tls),
            resolver=self._resolver,
            use_dns_cache=shared and not closing,  # a new client looks the name up afresh
            limit=0 if shared else 10,
            force_close=closing,
            enable_cleanup_closed=False,
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            # A cookie jar per run only when asked for: building one costs more than the
            # rest of the session, and shared sessions must not carry cookies across runs.
            cookie_jar=None if cookies and not shared else aiohttp.DummyCookieJar(),
            auto_decompress=True,
            # No session-wide headers nor skipped ones: each request carries its own
            # User-Agent (probes/http_common.py), which spares aiohttp a merge and a
            # skip-list copy per request.
        )

    def session_for(self, ctx: StepContext, tls: TlsConfig) -> aiohttp.ClientSession:
        if ctx.reuse_connections or ctx.one_request:
            closing = not ctx.reuse_connections
            known = self._by_id.get((id(tls), closing))
            if known is not None and known[0] is tls and not known[1].closed:
                return known[1]
            session = self._shared.get((tls, closing))
            if session is None or session.closed:
                session = self._new_session(tls, shared=True, closing=closing)
                self._shared[tls, closing] = session
            self._by_id[id(tls), closing] = (tls, session)
            return session
        sessions: dict[TlsConfig, aiohttp.ClientSession] = ctx.run_state.setdefault(_CLOSERS, {})
        session = sessions.get(tls)
        if session is None:
            session = sessions[tls] = self._new_session(tls, shared=False, cookies=ctx.cookies)
        return session

    @staticmethod
    def release_run(ctx: StepContext) -> Awaitable[None] | None:
        """Close the sessions a run opened (its connections were its own): what to await, or
        None when the run opened none (most runs: no coroutine made for them)."""
        sessions: dict[TlsConfig, aiohttp.ClientSession] | None = ctx.run_state.pop(_CLOSERS, None)
        return _close_all(sessions.values()) if sessions else None

    async def close(self) -> None:
        for session in self._shared.values():
            await session.close()
        self._shared.clear()
        self._by_id.clear()
        await self._resolver.close()


async def _close_all(sessions: Iterable[aiohttp.ClientSession]) -> None:
    for session in sessions:
        await session.close()
