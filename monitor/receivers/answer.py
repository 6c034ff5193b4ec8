"""The answer an accepted webhook gets, written as bytes made once per second instead of being
assembled by aiohttp for every delivery.

aiohttp's response path (status, headers checked and set one by one, the date, the serialized
head, the body written after it) is ~20 Python calls per request, more than the signature check
and the correlator together. An accepted delivery's answer is the same for every delivery on a
path (the configured status and body), so `PreparedAnswer` writes its head and body as one
buffer, rebuilt when the second (the Date header) or the connection's HTTP version or keep-alive
changes. It is still a `web.Response`: whatever aiohttp or an app does to it before it is sent
(a header set, a cookie, compression, chunking, a route's response signals) sends it aiohttp's
usual way instead, with the same headers. The public listener's own connections
(`receivers.wire`) write `Answer.wire` directly.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Final

from aiohttp import hdrs, web
from aiohttp.compression_utils import MAX_SYNC_CHUNK_SIZE
from aiohttp.http import SERVER_SOFTWARE, HttpVersion
from multidict import CIMultiDict

__all__ = ["Answer", "PreparedAnswer"]

_NO_BODY_STATUSES: Final = (204, 304)  # answers that must not carry a body (aiohttp drops it)


class Answer:
    """A configured answer (status, body, its content type) and the bytes it is sent as."""

    __slots__ = ("_wire", "body", "content_type", "reason", "status")

    def __init__(self, status: int, body: bytes | None = None, content_type: str | None = None):
        self.status = status
        try:
            self.reason = HTTPStatus(status).phrase  # as aiohttp words it
        except ValueError:
            self.reason = ""
        self.body = body
        self.content_type = content_type  # with its charset, as the Content-Type header says
        # (HTTP version, keep-alive) → (unix second, the answer's bytes for that second)
        self._wire: dict[tuple[HttpVersion, bool], tuple[int, bytes]] = {}

    def wire(self, version: HttpVersion, keep_alive: bool) -> bytes:
        """The whole answer as aiohttp would write it now: status line, headers, body."""
        now = int(time.time())
        key = (version, keep_alive)
        made = self._wire.get(key)
        if made is not None and made[0] == now:
            return made[1]
        body = self.body or b""
        head = [f"HTTP/{version[0]}.{version[1]} {self.status} {self.reason}"]
        if self.body is not None:
            head.append(f"{hdrs.CONTENT_TYPE}: {self.content_type}")
        if self.status in _NO_BODY_STATUSES:  # as aiohttp: no length and no body, its type kept
            body = b""
        else:
            head.append(f"{hdrs.CONTENT_LENGTH}: {len(body)}")
        head += [
            f"{hdrs.DATE}: {formatdate(now, usegmt=True)}",
            f"{hdrs.SERVER}: {SERVER_SOFTWARE}",
        ]
        # aiohttp's rule: say keep-alive to an HTTP/1.0 client that asked for it, close to an
        # HTTP/1.1 client that did not want it kept
        if keep_alive and version[:2] == (1, 0):
            head.append(f"{hdrs.CONNECTION}: keep-alive")
        elif not keep_alive and version[:2] == (1, 1):
            head.append(f"{hdrs.CONNECTION}: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        self._wire[key] = (now, data)
        return data


class PreparedAnswer(web.Response):
    """`answer` as a `web.Response`, sent as its prepared bytes when nothing changed it."""

    # web.Response's own state, set here: its __init__ parses what Answer has already
    _zlib_executor_size = MAX_SYNC_CHUNK_SIZE
    _zlib_executor = None

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._state: dict[Any, Any] = {}
        # empty unless someone adds to it: then aiohttp's way. Not `CIMultiDict[str]()`: calling
        # a subscripted class makes a GenericAlias and has it try (and fail, an AttributeError
        # made and dropped) to set `__orig_class__` on the result, ~3,000 instructions.
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._status = answer.status
        self._reason = answer.reason
        self._body = answer.body

    async def prepare(self, request: web.BaseRequest) -> Any:
        answer = self._answer
        if (
            self._headers
            or self._eof_sent
            or self._payload_writer is not None
            or self._cookies
            or self._compression
            or self._chunked
            # a routed request may have response signals to send (aiohttp's `_prepare_hook`
            # sends them only for one with match info); the webhook paths' own requests
            # come past the router (guard.FRONT) and have none
            or getattr(request, "_match_info", None) is not None
        ):
            if answer.body is not None and hdrs.CONTENT_TYPE not in self._headers:
                self._headers[hdrs.CONTENT_TYPE] = answer.content_type or ""
            return await super().prepare(request)
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        transport = request.transport
        if transport is None or transport.is_closing():  # as aiohttp's writer refuses it
            raise ConnectionResetError("Cannot write to closing transport")
        transport.write(answer.wire(request.version, keep_alive))
        self._eof_sent = True  # write_eof has nothing left to do
        self._body_length = len(answer.body or b"")
        return None
