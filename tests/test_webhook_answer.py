"""The configured answer written as prepared bytes (monitor.receivers.answer) says what aiohttp's
own response says, on a real 127.0.0.1 socket: status line, headers (the Date aside), body and
whether the connection stays open, for each HTTP version and keep-alive wish; and anything done
to it before it is sent sends it aiohttp's usual way."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import Counter

from monitor.correlator import Correlator
from monitor.demo.broker import free_port
from monitor.receivers.answer import Answer, PreparedAnswer
from monitor.receivers.guard import public_runner
from monitor.receivers.webhooks import install_webhook_routes
from monitor.rejects import RejectLog
from probes.kinds import WebhookRoute

PATH = "/hooks/in"
BODY = b'{"ref": "hw-1"}'
Serve = Callable[..., Awaitable[int]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Serve an app (with the public listener's runner when `public`) on a free port."""
    runners: list[web.BaseRunner] = []

    async def start(app: web.Application | web.Server, public: bool = False) -> int:
        if public:
            assert isinstance(app, web.Application)
            runner: web.BaseRunner = public_runner(app, RejectLog(None))
        elif isinstance(app, web.Application):
            runner = web.AppRunner(app, access_log=None)
        else:
            runner = web.ServerRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


async def exchange(
    port: int, version: str, extra: str = ""
) -> tuple[str, dict[str, str], bytes, bool]:
    """POST one JSON delivery; (status line, headers without Date, body, connection closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST {PATH} {version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(BODY)}\r\n{extra}\r\n"
    writer.write(head.encode() + BODY)
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = raw.decode("latin-1").split("\r\n")[:-2]
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers.pop("Date").endswith(" GMT")
    body = await reader.readexactly(int(headers.get("Content-Length", "0")))
    try:
        closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
    except TimeoutError:
        closed = False
    writer.close()
    return lines[0], headers, body, closed


def _reference(status: int, body: Any) -> web.Application:
    """aiohttp answering as hopwatch's configured answer is meant to read."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        if body is None:
            return web.Response(status=status)
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.Response(status=status, text=json.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_post(PATH, answer)
    return app


ANSWERS = [
    (202, None),
    (200, "ok\n"),
    (201, {"received": True}),
    (299, None),
    (204, None),
    (204, "dropped"),
    (304, {"dropped": True}),
    (503, "busy"),
]
VERSIONS = [
    ("HTTP/1.1", ""),
    ("HTTP/1.1", "Connection: close\r\n"),
    ("HTTP/1.0", ""),
    ("HTTP/1.0", "Connection: keep-alive\r\n"),
]


@pytest.mark.parametrize(("status", "body"), ANSWERS)
async def test_prepared_answer_says_what_aiohttp_says(
    serve: Serve,
    correlator: Correlator,
    arrivals: Counter,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    body: Any,
) -> None:
    written: list[bytes] = []  # what went out as prepared bytes
    wire = Answer.wire

    def spied(answer: Answer, *args: Any) -> bytes:
        written.append(wire(answer, *args))
        return written[-1]

    monkeypatch.setattr(Answer, "wire", spied)
    app = web.Application()
    install_webhook_routes(
        app,
        [WebhookRoute(PATH, None, respond_status=status, respond_body=body)],
        correlator,
        arrivals,
    )
    hopwatch = await serve(app, True)
    reference = await serve(_reference(status, body))
    for version, extra in VERSIONS:
        assert await exchange(hopwatch, version, extra) == await exchange(reference, version, extra)
    assert len(written) == len(VERSIONS)


async def test_an_answer_changed_before_it_is_sent_goes_aiohttps_way(serve: Serve) -> None:
    """A header added to it, or its connection closed, is honoured: aiohttp writes it."""
    answer = Answer(202, b"ok", "text/plain; charset=utf-8")

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        response = PreparedAnswer(answer)
        if request.headers.get("X-Want") == "header":
            response.headers["X-Extra"] = "1"
        elif request.headers.get("X-Want") == "close":
            response.force_close()
        return response

    port = await serve(web.Server(handler))
    status, headers, body, closed = await exchange(port, "HTTP/1.1")
    assert (status, body, closed, "X-Extra" in headers) == (
        "HTTP/1.1 202 Accepted",
        b"ok",
        False,
        False,
    )
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    status, headers, body, closed = await exchange(port, "HTTP/1.1", "X-Want: header\r\n")
    assert (headers["X-Extra"], headers["Content-Type"], body) == (
        "1",
        "text/plain; charset=utf-8",
        b"ok",
    )
    status, headers, body, closed = await exchange(port, "HTTP/1.1", "X-Want: close\r\n")
    assert (headers["Connection"], body, closed) == ("close", b"ok", True)
