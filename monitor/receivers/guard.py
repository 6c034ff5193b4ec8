"""The public listener's guard, because it faces the internet: read timeouts, and every reject
counted and logged once per cause and interval at WARNING, never a traceback per request.

aiohttp logs a parser-level reject (a bad request line, an oversized header, a broken chunk) as
an ERROR with a traceback, and bounds the wait for a request head only by its keep-alive
timeout (an hour by default). The public listener's runner uses a request handler that counts
such rejects as `malformed` in `hopwatch_arrivals_total{source="webhook"}` instead, and sets
the keep-alive timeout to the header timeout: a connection that has not sent a whole request
head `header_timeout` seconds after it opened (or after its last answer) is closed. The body
timeout is the webhook handler's (`monitor.receivers.webhooks`).

A connection to a listener with webhook paths starts as the listener's own
(`monitor.receivers.wire`), with the same timeouts; it answers plain deliveries itself and
hands anything else to the guarded handler here for the rest of the connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from monitor.receivers.wire import ServedPaths, WebhookConnection
from monitor.rejects import RejectLog

__all__ = ["BODY_TIMEOUT", "FRONT", "HEADER_TIMEOUT", "LINGER", "public_runner"]

HEADER_TIMEOUT: Final = 10.0  # seconds for a whole request head, from connect or last answer
BODY_TIMEOUT: Final = 30.0  # seconds for a whole body, from the end of its head
# How long an answer that did not read the whole body (413, 408, 404) waits, reading and
# dropping, before it closes; aiohttp's 10 s would let a slow client hold the connection.
LINGER: Final = 1.0

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Front(ServedPaths, Protocol):
    """What an app may put under FRONT (the webhook paths do): the paths a connection serves
    itself (`receivers.wire`), and for the requests that reach aiohttp, given the app's own
    handler (router, middlewares), a handler that serves the requests it knows itself and hands
    it the others: aiohttp's router (a catch-all route's regex, a match-info object, three
    coroutines) cost more per delivery than the signature check."""

    def front(self, rest: Handler) -> Handler: ...


FRONT: Final[web.AppKey[Front]] = web.AppKey("hopwatch_front")


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
    """Makes a connection's protocol: a `WebhookConnection` when the app has FRONT paths (it
    hands what it does not serve to a `_GuardedHandler`), a `_GuardedHandler` otherwise. Its
    `reject_log` and `paths` are set by `public_runner`."""

    reject_log: RejectLog
    paths: Front | None
    wire: set[WebhookConnection]

    def __call__(self) -> Any:  # an asyncio.Protocol (aiohttp's annotation says its own)
        if self.paths is None:
            return self.guarded()
        return WebhookConnection(
            self.paths, self._kwargs["keepalive_timeout"], self.guarded, self.wire
        )

    def guarded(self) -> _GuardedHandler:
        return _GuardedHandler(
            self,
            reject_log=self.reject_log,
            loop=self._loop,
            **self._kwargs,
        )

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for connection in list(self.wire):
            connection.close()

    async def shutdown(self, timeout: float | None = None) -> None:
        for connection in list(self.wire):  # opened since pre_shutdown
            connection.close()
        await super().shutdown(timeout)


class _PublicRunner(web.AppRunner):
    def __init__(self, app: web.Application, reject_log: RejectLog, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._reject_log = reject_log

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer  # same state, the guarded handler factory
        assert isinstance(server, _GuardedServer)
        server.reject_log = self._reject_log
        server.wire = set()
        server.paths = front = self._app.get(FRONT)
        if front is not None:  # read by each connection's handler as it is made
            server.request_handler = front.front(server.request_handler)
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
