"""HTTP clients lent to probes: fresh connections per run by default, kept across runs on request.

Two clients, the same rules: the wire client's pools (probes/http_wire.py, plain requests) and
aiohttp's sessions (redirects, HEAD, per-run cookies). What is costly to build (SSL contexts,
the resolver) is built once and shared; what makes a run look like a new client (DNS lookup,
TCP and TLS handshakes) is done per run unless the flow opts into `reuse_connections`. A run
that sends one request in all takes its new connection from a shared pool (or session) that
closes every connection after its response: the same handshakes, nothing built per run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import Any

import aiohttp

from probes.base import StepContext
from probes.http_common import TimedConnector, TimedResolver, TlsConfig, build_ssl_context
from probes.http_wire import DNS_TTL_S, WirePool

_CLOSERS = "_http_sessions"
_WIRES = "_http_wires"


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
        # The wire client's pools, found as the sessions are: (TLS settings, keep) → pool.
        self._wires: dict[tuple[TlsConfig, bool], WirePool] = {}
        self._wires_by_id: dict[tuple[int, bool], tuple[TlsConfig, WirePool]] = {}

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

    def wire_for(self, ctx: StepContext, tls: TlsConfig) -> WirePool | None:
        """Kept-alive runs share a pool that keeps connections; one-request runs share one that
        closes each; other runs have a pool of their own, closed with the run (its steps reuse
        its connections). Runs that keep cookies go through aiohttp's session."""
        if ctx.reuse_connections or ctx.one_request:
            keep = ctx.reuse_connections
            known = self._wires_by_id.get((id(tls), keep))
            if known is not None and known[0] is tls:
                return known[1]
            pool = self._wires.get((tls, keep))
            if pool is None:
                pool = self._wires[tls, keep] = self._new_wire(tls, keep=keep)
            self._wires_by_id[id(tls), keep] = (tls, pool)
            return pool
        if ctx.cookies:
            return None
        pools: dict[TlsConfig, WirePool] = ctx.run_state.setdefault(_WIRES, {})
        pool = pools.get(tls)
        if pool is None:
            pool = pools[tls] = self._new_wire(tls, keep=True, dns_cache=False)
        return pool

    def _new_wire(self, tls: TlsConfig, *, keep: bool, dns_cache: bool = True) -> WirePool:
        return WirePool(
            ssl_context=self._ssl_for(tls),
            resolver=self._resolver,
            keep=keep,
            # A new client looks the name up afresh, as the sessions do.
            dns_ttl=DNS_TTL_S if keep and dns_cache else None,
        )

    @staticmethod
    def release_run(ctx: StepContext) -> Awaitable[None] | None:
        """Close the connections a run opened (they were its own): what to await, or None when
        there is nothing to wait for (most runs: no coroutine made for them)."""
        pools: dict[TlsConfig, WirePool] | None = ctx.run_state.pop(_WIRES, None)
        if pools:
            for pool in pools.values():
                pool.close()
        sessions: dict[TlsConfig, aiohttp.ClientSession] | None = ctx.run_state.pop(_CLOSERS, None)
        return _close_all(sessions.values()) if sessions else None

    async def close(self) -> None:
        for pool in self._wires.values():
            pool.close()
        self._wires.clear()
        self._wires_by_id.clear()
        for session in self._shared.values():
            await session.close()
        self._shared.clear()
        self._by_id.clear()
        await self._resolver.close()


async def _close_all(sessions: Iterable[aiohttp.ClientSession]) -> None:
    for session in sessions:
        await session.close()
