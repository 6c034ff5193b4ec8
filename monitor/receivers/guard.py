"""The public listener's guard, because it faces the internet: read timeouts, and every reject
counted and logged once per cause and interval at WARNING, never a traceback per request.

aiohttp logs a parser-level reject (a bad request line, an oversized header, a broken chunk) as
an ERROR with a traceback, and bounds the wait for a request head only by its keep-alive
timeout (an hour by default). The public listener's runner uses a request handler that counts
such rejects as `malformed` in `hopwatch_arrivals_total{source="webhook"}` instead, and sets
the keep-alive timeout to the header timeout: a connection that has not sent a whole request
head `header_timeout` seconds after it opened (or after its last answer) is closed. The body
timeout is the webhook handler's (`monitor.receivers.webhooks`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

if TYPE_CHECKING:
    from prometheus_client import Counter

__all__ = ["BODY_TIMEOUT", "HEADER_TIMEOUT", "LOG_INTERVAL", "RejectLog", "public_runner"]

log = logging.getLogger(__name__)

HEADER_TIMEOUT: Final = 10.0  # seconds for a whole request head, from connect or last answer
BODY_TIMEOUT: Final = 30.0  # seconds for a whole body, from the end of its head
# How long an answer that did not read the whole body (413, 408, 404) waits, reading and
# dropping, before it closes; aiohttp's 10 s would let a slow client hold the connection.
LINGER: Final = 1.0
LOG_INTERVAL: Final = 60.0  # each reject cause is logged at most once in this many seconds


class RejectLog:
    """Counts rejects as `malformed` webhook arrivals and logs each cause at most once per
    `interval`, with how many came since it was last logged."""

    def __init__(self, counter: Counter | None, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._child: Any = (
            counter.labels(source="webhook", outcome="malformed") if counter is not None else None
        )
        self._logged_at: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def reject(self, cause: str, detail: str) -> None:
        if self._child is not None:
            self._child.inc()
        self._since[cause] = self._since.get(cause, 0) + 1
        now = time.monotonic()
        last = self._logged_at.get(cause)
        if last is not None and now - last < self.interval:
            return
        self._logged_at[cause] = now
        count = self._since.pop(cause)
        detail = detail.splitlines()[0][:120] if detail else ""  # what a client wrote: bounded
        log.warning(
            "public listener refused %d request(s) for %s since last said (latest: %r); "
            "said at most once per %gs",
            count,
            cause,
            detail,
            self.interval,
        )


class _GuardedHandler(RequestHandler):
    """aiohttp's per-connection handler, with parser-level rejects counted, not traced."""

    def __init__(self, manager: Server, *, reject_log: RejectLog, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._reject_log = reject_log
        self._quiet = False

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):  # the parser refused what the client sent
            self._reject_log.reject("bad_request", type(exc).__name__)
            self._quiet = True
        try:
            return super().handle_error(request, status, exc, message)
        finally:
            self._quiet = False

    def log_exception(self, *args: Any, **kw: Any) -> None:
        if not self._quiet:  # our own bugs keep their traceback
            super().log_exception(*args, **kw)


class _GuardedServer(Server):
    """Makes `_GuardedHandler`s; its `reject_log` is set by `public_runner`."""

    reject_log: RejectLog

    def __call__(self) -> RequestHandler:
        return _GuardedHandler(
            self,
            reject_log=self.reject_log,
            loop=self._loop,
            **self._kwargs,
        )


class _PublicRunner(web.AppRunner):
    def __init__(self, app: web.Application, reject_log: RejectLog, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._reject_log = reject_log

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer  # same state, the guarded handler factory
        assert isinstance(server, _GuardedServer)
        server.reject_log = self._reject_log
        return server


def public_runner(
    app: web.Application, reject_log: RejectLog, *, header_timeout: float = HEADER_TIMEOUT
) -> web.AppRunner:
    """The runner of the public listener (call `setup()` on it, as on any AppRunner)."""
    return _PublicRunner(
        app,
        reject_log,
        access_log=None,
        keepalive_timeout=header_timeout,
        lingering_time=LINGER,
    )
