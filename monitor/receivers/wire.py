"""The public listener's own HTTP/1.1 connection: a plain webhook delivery read, checked and
answered in `data_received`, without aiohttp's request objects, tasks and response machinery.

Why: aiohttp's server spends ~50 µs of CPU on a request before any handler runs (a message,
a payload stream, a request object, a task's coroutine steps, a response writer): as much as
verifying, parsing and matching the delivery together. A delivery is small, usually comes
whole in one read, and its answer is bytes made once per second (`receivers.answer`), so
nothing in it needs to wait.

Only the plain case is served here: a POST with one Content-Length (at most the path's
`max_body`) to a served path (no query, escapes or dot segments), HTTP/1.0 or 1.1 (with a
Host), no Transfer-Encoding, Content-Encoding, Expect or Upgrade, headers within aiohttp's
limits. Anything else, and anything httptools (llhttp, which aiohttp's parser is built on too)
refuses, is handed with the bytes of the request it is in to aiohttp's request handler for the
rest of the connection: every other answer (404, 405, 100-continue, 417, the parser's 400,
chunked and compressed bodies, 413 by Content-Length) stays aiohttp's and the guard's, counted
as before. `tests/test_webhook_wire.py` sends the same bytes both ways and compares.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Callable
from typing import Final, Protocol, cast

import httptools
from aiohttp import hdrs
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_parser import SINGLETON_HEADERS
from multidict import CIMultiDict, CIMultiDictProxy, istr

from monitor.receivers.answer import Answer

__all__ = ["BODY_LATE", "TEXT", "Served", "ServedPaths", "WebhookConnection"]

BODY_LATE: Final = "body not received in time"
HEAD_LIMIT: Final = 64 * 1024  # a head not whole by then goes to aiohttp, which has its limits
# aiohttp's request parser's limits (web_protocol.RequestHandler's defaults): past them it
# answers 400, so such a request is handed to it.
_MAX_FIELD: Final = 8190
_MAX_HEADERS: Final = 128
_VERSIONS: Final = {"1.1": HttpVersion11, "1.0": HttpVersion10}
# The header names aiohttp's parser gives as its own constants (canonical case), whatever
# case they came in; other names stay as sent.
_KNOWN: Final = {str(v).lower().encode(): v for v in vars(hdrs).values() if isinstance(v, istr)}
# aiohttp refuses a second one of these
_SINGLETONS: Final = frozenset(name.encode() for name in SINGLETON_HEADERS)
# Any of these sends the request aiohttp's way (it decodes, continues, upgrades, de-chunks).
_ELSEWHERE: Final = frozenset({b"transfer-encoding", b"content-encoding", b"expect", b"upgrade"})
# A path aiohttp's `request.path` reads otherwise than its bytes: a query, a fragment, escapes,
# dot segments (and anything but a path).
_NOT_PLAIN_URL: Final = re.compile(rb"[?#%]|/\.|^[^/]")
assert _KNOWN.keys() >= _SINGLETONS | _ELSEWHERE  # `_plain_request` looks for them as known

_HEAD, _BODY, _GONE = 0, 1, 2  # a connection's states
TEXT: Final = "text/plain; charset=utf-8"
_OUR_ERROR: Final = Answer(500, b"500 Internal Server Error\n\nServer got itself in trouble", TEXT)
log = logging.getLogger(__name__)

# A header name as sent → (the name as aiohttp gives it, its lower-case form when aiohttp allows
# one only), or None when this connection does not serve a request with it. Senders send the
# same few names every time; the cache is bounded since anyone may send any.
_NAMES: dict[bytes, tuple[str, bytes | None] | None] = {}
_NAMES_MAX: Final = 1024


def _name(name: bytes) -> tuple[str, bytes | None] | None:
    low = name.lower()
    known = _KNOWN.get(low)
    named: tuple[str, bytes | None] | None
    if low in _ELSEWHERE:
        named = None
    elif known is None:
        named = (name.decode("utf-8", "surrogateescape"), None)
    else:
        named = (known, low if low in _SINGLETONS else None)
    if len(_NAMES) >= _NAMES_MAX:
        _NAMES.clear()
    _NAMES[name] = named
    return named


class Served(Protocol):
    """One served path (`webhooks._PathHandler`)."""

    path: str
    max_body: int
    body_timeout: float

    def accept(
        self,
        headers: CIMultiDictProxy[str],
        body: bytes,
        remote: str | None,
        received_at: float,
        received_unix: float,
    ) -> Answer: ...

    def body_late(self) -> None: ...

    def cut_off(self, why: str) -> None: ...


class ServedPaths(Protocol):
    """The listener's paths (`webhooks.WebhookPaths`), looked up per request (a reload
    replaces them)."""

    def served(self, path: str) -> Served | None: ...


class WebhookConnection(asyncio.Protocol):
    """One connection to the public listener, until a request needs aiohttp (`_hand_over`)."""

    def __init__(
        self,
        paths: ServedPaths,
        header_timeout: float,
        aiohttp_handler: Callable[[], asyncio.Protocol],
        open_connections: set[WebhookConnection],
    ) -> None:
        self._paths = paths
        self._header_timeout = header_timeout
        self._aiohttp_handler = aiohttp_handler
        self._open = open_connections
        self._parser = httptools.HttpRequestParser(self)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._remote: str | None = None
        self._state = _HEAD
        self._buffer = b""  # the current request's bytes so far (and any after it)
        self._reads: list[int] = []  # where in `_buffer` a later read's bytes begin
        self._fed = 0  # how many of them the parser has had
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []  # as httptools gives them
        self._pairs: list[tuple[str, str]] = []  # as aiohttp's parser would
        self._head_done = False
        self._served: Served | None = None
        self._head_len = 0
        self._body_len = 0
        self._version = HttpVersion11
        self._keep_alive = True
        self._deadline = 0.0  # when the idle, head or body wait runs out (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False  # reading paused while the transport's buffer drains

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not one
        self._open.add(self)
        peer = transport.get_extra_info("peername")  # as aiohttp's `request.remote`
        self._remote = str(peer[0]) if isinstance(peer, (list, tuple)) else str(peer)
        self._wait(self._header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._buffer:
            self._reads.append(len(self._buffer))
            self._buffer += data
        else:
            self._buffer = data
        while self._state != _GONE:
            if self._state == _HEAD and not self._read_head():
                return
            if self._state == _BODY and not self._answer():
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == _BODY and self._served is not None:
            self._served.cut_off(type(exc).__name__ if exc else "closed mid-body")
        self._gone()

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and self._paused:
            self._paused = False
            self._transport.resume_reading()

    # -- httptools' callbacks -------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url  # in pieces when the head comes in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_done = True
        # asked now, as aiohttp's parser asks: once a body-less message is complete (in the
        # same feed) llhttp has reset its flags, and would answer for an empty next request
        self._keep_alive = self._parser.should_keep_alive()

    # -- the server's shutdown (guard._GuardedServer) ---------------------------------------

    def close(self) -> None:
        """Close now: a request is never left half answered (each is answered as it comes
        whole), and one still coming is cut off, as aiohttp cuts it."""
        if self._transport is not None:
            self._served = None  # our own close, not the client's
            self._transport.close()
        self._gone()

    # -- the work -------------------------------------------------------------------------

    def _read_head(self) -> bool:
        """Feed the parser up to the end of the head; decide who serves the request. False
        when nothing more can be done until more bytes come."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n", max(0, self._fed - 3))
        upto = len(buffer) if end < 0 else end + 4
        try:
            self._parser.feed_data(buffer[self._fed : upto])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # aiohttp says why
            self._hand_over()
            return False
        self._fed = upto
        if not self._head_done:
            if end >= 0 or len(buffer) > HEAD_LIMIT:
                self._hand_over()  # a head llhttp reads otherwise, or a long one
            return False
        served = self._plain_request()
        if served is None:
            self._hand_over()
            return False
        self._served = served
        self._head_len = upto
        self._state = _BODY
        if len(buffer) - upto < self._body_len:  # the rest of the body is on its way
            self._wait(served.body_timeout)
        return True

    def _plain_request(self) -> Served | None:
        """The served path of a request this connection answers itself, else None; its
        headers made as aiohttp's parser makes them on the way."""
        parser = self._parser
        url = self._url
        version = _VERSIONS.get(parser.get_http_version())
        if version is None or parser.get_method() != b"POST" or len(self._headers) > _MAX_HEADERS:
            return None
        served = self._paths.served(url.decode("ascii", "replace"))
        if served is None or _NOT_PLAIN_URL.search(url) is not None:
            return None
        length = -1
        seen: set[bytes] = set()
        pairs: list[tuple[str, str]] = []
        previous = 0
        for name, value in self._headers:
            size = len(name)
            # aiohttp's parser counts a name's first read with the previous header's name, and
            # a name that came in pieces (or the first one) with its value: past _MAX_FIELD
            # either way, aiohttp decides, given the reads as they came (`_hand_over`)
            if previous + size > _MAX_FIELD or size + len(value) > _MAX_FIELD:
                return None
            previous = size
            named = _NAMES.get(name) or _name(name)
            if named is None:  # a header aiohttp reads itself
                return None
            key, singleton = named
            if singleton is not None:
                if singleton in seen:
                    return None
                seen.add(singleton)
                if singleton == b"content-length":
                    length = int(value) if value.isdigit() else -1
            if b"\x00" in value:  # as aiohttp: no NUL, no trailing blanks
                return None
            pairs.append((key, value.rstrip(b" \t").decode("utf-8", "surrogateescape")))
        if not 0 <= length <= served.max_body or (version is HttpVersion11 and b"host" not in seen):
            return None
        self._pairs = pairs
        self._version = version
        self._body_len = length
        return served

    def _answer(self) -> bool:
        """Answer the request once its body is whole. False when it is not yet."""
        buffer = self._buffer
        end = self._head_len + self._body_len
        if len(buffer) < end:
            return False
        served = self._served
        assert served is not None and self._transport is not None
        received_at = time.monotonic()
        body = buffer[self._head_len : end]
        try:
            if body:
                self._parser.feed_data(body)  # the parser's message ends: ready for the next
        except httptools.HttpParserError:  # not after a valid head with a Content-Length
            self._hand_over()
            return False
        headers = CIMultiDictProxy(CIMultiDict(self._pairs))
        keep_alive = self._keep_alive
        try:
            answer = served.accept(headers, body, self._remote, received_at, time.time())
        except Exception:  # our bug: a 500 and a traceback, as aiohttp gives a handler's
            log.exception("webhook path %s: error handling a delivery", served.path)
            answer, keep_alive = _OUR_ERROR, False
        self._transport.write(answer.wire(self._version, keep_alive))
        if not keep_alive:
            self.close()
            return False
        self._buffer = buffer[end:]
        if self._reads:
            self._reads = [at - end for at in self._reads if at > end]
        self._fed = 0
        self._url = b""
        self._headers = []
        self._head_done = False
        self._served = None
        self._state = _HEAD
        self._wait(self._header_timeout)
        return True

    def _hand_over(self) -> None:
        """From the start of the current request on, aiohttp serves this connection. It is
        given the bytes in the reads they came in: what its parser refuses, and how it words
        it, depends on where a read ended (a header name's length is checked per read)."""
        transport = self._transport
        data = self._buffer
        bounds = [0, *self._reads, len(data)]
        self._served = None
        self._gone()
        if transport is None or transport.is_closing():
            return
        handler = self._aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._paused:  # the transport still holds our unsent answers
            handler.pause_writing()
            transport.resume_reading()
        for start, end in itertools.pairwise(bounds):
            if end > start:
                handler.data_received(data[start:end])

    def _gone(self) -> None:
        self._state = _GONE
        self._buffer = b""
        self._reads = []
        self._open.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- timeouts: one timer a connection, moved only when it fires early -----------------

    def _wait(self, seconds: float) -> None:
        loop = self._loop
        deadline = self._deadline = loop.time() + seconds
        timer = self._timer
        if timer is None or timer.when() > deadline:  # a later one is moved when it fires
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self._state == _GONE:
            return
        loop = self._loop
        if loop.time() < self._deadline:  # moved on since: wait for the new deadline
            self._timer = loop.call_at(self._deadline, self._timed_out)
            return
        transport = self._transport
        if self._state == _BODY and self._served is not None and transport is not None:
            self._served.body_late()
            late = Answer(408, (BODY_LATE + "\n").encode(), TEXT)
            transport.write(late.wire(self._version, False))
        self.close()  # no whole head (or body) in time
