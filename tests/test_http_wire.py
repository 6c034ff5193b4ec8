"""The wire client (probes/http_wire.py) against aiohttp's: the same bytes on the wire, the same
answers read back, and its own failure handling, over real sockets on loopback."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from probes import http_wire
from probes.errors import ConnectError, OtherFailure, StepFailed
from probes.http_common import PhaseTimer, Response, TimedResolver
from probes.http_wire import WirePool

Answer = Callable[[bytes], Awaitable[bytes | None]]  # request bytes → what to write (None: close)


class RawServer:
    """Keeps each request's bytes and answers it with whatever `answer` says, byte for byte."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + (await reader.readexactly(length) if length else b"")
                self.requests.append(request)
                reply = await self.answer(request)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
                if b"connection: close" in request.lower() or b"Connection: close" in reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Answer], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(answer: Answer) -> RawServer:
        server = RawServer(answer)
        server.server = await asyncio.start_server(server._handle, "127.0.0.1", 0)
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert server.server is not None
        server.server.close()


def ok(body: bytes = b"ok", extra: bytes = b"") -> Answer:
    async def answer(_: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)

    return answer


def wire(keep: bool) -> WirePool:
    return WirePool(ssl_context=None, resolver=TimedResolver(), keep=keep, dns_ttl=None)


async def via_wire(pool: WirePool, method: str, url: str, **kw: Any) -> Response:
    answer = await pool.send(
        PhaseTimer(), method, url, kw.get("headers", {}), kw.get("params"), kw.get("data")
    )
    assert answer is not None
    return answer


async def via_aiohttp(keep: bool, method: str, url: str, **kw: Any) -> tuple[int, list[Any], bytes]:
    """The request as probes.http_common sends it through monitor.http_clients' sessions."""
    connector = aiohttp.TCPConnector(force_close=not keep)
    async with (
        aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.request(
            method,
            url,
            headers=kw.get("headers", {}),
            params=kw.get("params"),
            data=kw.get("data"),
            allow_redirects=False,
        ) as resp,
    ):
        return resp.status, list(resp.headers.items()), await resp.read()


REQUESTS = [
    ("GET", "/p", {}),
    ("GET", "/p a/é?q=1 2#frag", {"params": {"a b": "c/d&e", "x": "é"}}),
    ("POST", "/echo", {"data": b'{"a":1}', "headers": {"Content-Type": "application/json"}}),
    ("POST", "/raw", {"data": b"abc"}),
    ("POST", "/empty", {}),
    ("PUT", "/x", {"data": b"x", "headers": {"content-type": "text/plain"}}),
    ("PATCH", "/x", {}),
    ("DELETE", "/x", {}),
    ("DELETE", "/x", {"data": b"gone"}),
    ("OPTIONS", "/", {}),
    ("GET", "/h", {"headers": {"User-Agent": "hopwatch", "user-agent": "again", "Accept": "a/b"}}),
    ("GET", "/h", {"headers": {"X-Hopwatch-Run": "r1", "traceparent": "00-ab-cd-01"}}),
]


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "closed"])
@pytest.mark.parametrize(("method", "path", "kw"), REQUESTS)
async def test_sends_the_bytes_aiohttp_sends(
    raw: Callable[[Answer], Awaitable[RawServer]],
    keep: bool,
    method: str,
    path: str,
    kw: dict[str, Any],
) -> None:
    server = await raw(ok())
    await via_aiohttp(keep, method, server.url + path, **kw)
    pool = wire(keep)
    await via_wire(pool, method, server.url + path, **kw)
    pool.close()
    theirs, ours = server.requests
    assert ours == theirs


async def _chunked(_: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )


async def _early_hints(_: bytes) -> bytes:
    return b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + await ok(b"late")(b"")


async def _until_close(_: bytes) -> bytes | None:
    return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it, till the end"


def _encoded(coding: bytes, body: bytes) -> Answer:
    return ok(body, b"Content-Encoding: " + coding + b"\r\n")


ANSWERS: dict[str, Answer] = {
    "plain": ok(b'{"ok":true}', b"Content-Type: application/json\r\n"),
    "chunked, repeated header": _chunked,
    "early hints first": _early_hints,
    "body until close": _until_close,
    "gzip": _encoded(b"gzip", gzip.compress(b"zipped" * 100)),
    "deflate (zlib)": _encoded(b"deflate", zlib.compress(b"deflated" * 100)),
    "deflate (raw)": _encoded(b"deflate", zlib.compress(b"raw" * 100, wbits=-15)),
    "unknown coding": _encoded(b"compress", b"\x1f\x9dstays"),
    "no content": ok(b"", b"X-Empty: yes\r\n"),
    "non-ASCII header": ok(b"", "X-Name: Zoë\r\n".encode()),
    "404 with a body": lambda _: asyncio.sleep(
        0, b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope"
    ),
}


@pytest.mark.parametrize("answer", ANSWERS.values(), ids=ANSWERS.keys())
async def test_reads_answers_as_aiohttp_reads_them(
    raw: Callable[[Answer], Awaitable[RawServer]], answer: Answer
) -> None:
    server = await raw(answer)
    theirs = await via_aiohttp(True, "GET", server.url + "/")
    pool = wire(True)
    ours = await via_wire(pool, "GET", server.url + "/")
    pool.close()
    assert (ours.status, list(ours.headers.items()), ours.body) == theirs


async def test_an_answer_in_single_bytes_is_read_whole() -> None:
    """The answer comes a byte a write: parsed as it comes, complete only at its end."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

    async def dribbling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for i in range(len(reply)):
            writer.write(reply[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.close()

    server = await asyncio.start_server(dribbling, "127.0.0.1", 0)
    pool = wire(True)
    port = server.sockets[0].getsockname()[1]
    answer = await via_wire(pool, "GET", f"http://127.0.0.1:{port}/")
    assert (answer.status, answer.body) == (200, b"hello")
    assert answer.phases["transfer"] > 0
    pool.close()
    server.close()


async def test_keeps_a_connection_and_retries_once_when_it_went_stale(
    raw: Callable[[Answer], Awaitable[RawServer]],
) -> None:
    """The kept connection is reused; closed by the server without an answer (it timed the
    connection out as the request went), the GET is sent once more on a new connection
    instead of failing, as aiohttp does."""
    server = await raw(ok())
    pool = wire(True)
    first = await via_wire(pool, "GET", server.url + "/")
    second = await via_wire(pool, "GET", server.url + "/")
    assert "connect" in first.phases and "connect" not in second.phases
    assert server.connections == 1
    server.answer = _close_first_then(ok(b"again"))
    third = await via_wire(pool, "GET", server.url + "/")
    assert (third.status, third.body) == (200, b"again")
    assert "connect" in third.phases and server.connections == 2
    pool.close()


def _close_first_then(answer: Answer) -> Answer:
    closed: list[bool] = []

    async def once(request: bytes) -> bytes | None:
        if not closed:
            closed.append(True)
            return None
        return await answer(request)

    return once


async def test_a_post_on_a_connection_closed_unanswered_fails(
    raw: Callable[[Answer], Awaitable[RawServer]],
) -> None:
    """A POST is not sent twice: it may have been acted on."""
    server = await raw(_close_first_then(ok()))
    pool = wire(False)
    with pytest.raises(ConnectError, match="failed: Server disconnected"):
        await via_wire(pool, "POST", server.url + "/", data=b"x")


async def test_a_connection_closed_at_once_is_a_connect_error() -> None:
    """Accepted, then closed before a byte of answer (a server shedding load): whether the
    close lands before the request is written or after, the step fails as a connect error."""

    async def shed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(shed, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = wire(False)
    for _ in range(5):
        with pytest.raises(ConnectError, match="failed: Server disconnected"):
            await via_wire(pool, "GET", f"http://127.0.0.1:{port}/")
    server.close()


async def test_a_body_cut_short_and_a_garbled_answer_are_named(
    raw: Callable[[Answer], Awaitable[RawServer]],
) -> None:
    async def cut(_: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"

    async def garbled(_: bytes) -> bytes:
        return b"SPDY/9 ??\r\n\r\n"

    async def bad_gzip(_: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc"

    pool = wire(False)
    for answer, kind, words in [
        (cut, ConnectError, "broke mid-response"),
        (garbled, OtherFailure, "Unparsable"),
        (bad_gzip, ConnectError, "Can not decode content-encoding"),
    ]:
        server = await raw(answer)
        with pytest.raises(StepFailed, match=words) as failed:
            await via_wire(pool, "GET", server.url + "/")
        assert isinstance(failed.value, kind)


async def test_a_cancelled_request_leaves_no_connection_to_reuse(
    raw: Callable[[Answer], Awaitable[RawServer]],
) -> None:
    """The step's time ran out mid-answer: that connection's late bytes must not be taken for
    the next request's answer."""
    slow = asyncio.Event()

    async def hang(_: bytes) -> bytes:
        await slow.wait()
        return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate"

    server = await raw(hang)
    pool = wire(True)
    arrived = asyncio.Event()
    server.answer = lambda request: (arrived.set(), hang(request))[1]
    task = asyncio.ensure_future(via_wire(pool, "GET", server.url + "/"))
    await arrived.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not any(pool._idle.values())
    slow.set()
    server.answer = ok(b"fresh")
    answer = await via_wire(pool, "GET", server.url + "/")
    assert answer.body == b"fresh" and "connect" in answer.phases
    pool.close()


async def test_idle_connections_are_closed_after_the_keepalive_time(
    raw: Callable[[Answer], Awaitable[RawServer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await raw(ok())
    pool = wire(True)
    await via_wire(pool, "GET", server.url + "/")
    monkeypatch.setattr(http_wire, "KEEPALIVE_S", 0.0)
    answer = await via_wire(pool, "GET", server.url + "/")
    assert "connect" in answer.phases and server.connections == 2
    pool.close()


async def test_leaves_to_aiohttp_what_it_does_not_take() -> None:
    """URLs with credentials, other schemes, a step's own Host header: None, nothing sent."""
    pool = wire(True)
    for url, headers in [
        ("http://user:pw@127.0.0.1:9/", {}),
        ("ftp://127.0.0.1/", {}),
        ("not a url", {}),
        ("http://127.0.0.1:9/", {"host": "elsewhere"}),
    ]:
        assert await pool.send(PhaseTimer(), "GET", url, headers, None, None) is None


async def test_a_header_value_with_a_line_break_is_refused(
    raw: Callable[[Answer], Awaitable[RawServer]],
) -> None:
    """A rendered value cannot add a header: refused before anything is sent, as aiohttp does."""
    server = await raw(ok())
    pool = wire(True)
    injected = {"X-A": "1\r\nX-Injected: 2"}
    with pytest.raises(ValueError, match="Forbidden control character"):
        await via_wire(pool, "GET", server.url + "/", headers=injected)
    with pytest.raises(ValueError, match="Forbidden control character"):
        await via_aiohttp(True, "GET", server.url + "/", headers=injected)
    assert server.requests == []
