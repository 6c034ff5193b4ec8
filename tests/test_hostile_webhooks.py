"""The public listener under hostile input, on a real 127.0.0.1 socket: deep JSON, parser-level
rejects, clients that stop mid-body or trickle their head or body; each counted once as
`malformed`, logged at most once per cause and interval, never a 500 nor a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from monitor.correlator import Correlator
from monitor.demo.broker import free_port
from monitor.receivers.guard import public_runner
from monitor.receivers.webhooks import WebhookRoute, _PathHandler, install_webhook_routes
from monitor.rejects import RejectLog
from probes import untrusted_json
from probes.signatures import StandardWebhooksSignature
from tests.fixtures.webhooks import SW_SECRET, arrivals_count, standard_headers

PATH = "/hooks/in"
DEEP = b"[" * 10_000 + b"]" * 10_000
Listener = Callable[..., Awaitable[int]]


@pytest.fixture
async def listener(correlator: Correlator, arrivals: Counter) -> AsyncIterator[Listener]:
    """Start the public listener (guarded runner, webhook routes) on a free port."""
    runners: list[web.AppRunner] = []

    async def start(
        route: WebhookRoute, *, header_timeout: float = 10.0, body_timeout: float = 30.0
    ) -> int:
        rejects = RejectLog(arrivals)
        app = web.Application()
        install_webhook_routes(
            app, [route], correlator, arrivals, body_timeout=body_timeout, reject_log=rejects
        )
        runner = public_runner(app, rejects, header_timeout=header_timeout)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


class _Records(logging.Handler):
    """Keeps aiohttp's and hopwatch's log records; `warned` is set on the first WARNING."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.warned = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if record.levelno == logging.WARNING:
            self.warned.set()

    def at(self, level: int) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno >= level]


@pytest.fixture
def logs() -> AsyncIterator[_Records] | Any:
    handler = _Records()
    names = ("aiohttp.server", "aiohttp.web", "monitor.receivers", "monitor.rejects")
    for name in names:
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield handler
    for name in names:
        logging.getLogger(name).removeHandler(handler)
        logging.getLogger(name).setLevel(logging.NOTSET)


async def raw_exchange(port: int, data: bytes, *, close: bool = False) -> bytes:
    """Send `data` on a fresh connection; read the answer until the server closes (or, with
    `close`, hang up at once and return nothing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if close:
            return b""
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_deep_json_is_malformed_not_a_500(
    listener: Listener, registry: CollectorRegistry, logs: _Records
) -> None:
    port = await listener(WebhookRoute(PATH, None))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}{PATH}",
            data=DEEP,
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        assert resp.status == 400
        assert "nested deeper than 100 levels" in await resp.text()
    assert arrivals_count(registry, "malformed") == 1
    assert not logs.at(logging.ERROR)


async def test_deep_json_validly_signed_is_malformed(
    listener: Listener, registry: CollectorRegistry, logs: _Records
) -> None:
    signature = StandardWebhooksSignature.model_validate(
        {"scheme": "standard_webhooks", "secret": SW_SECRET}
    )
    port = await listener(WebhookRoute(PATH, signature))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}{PATH}", data=DEEP, headers=standard_headers(DEEP, "m-1")
        ) as resp,
    ):
        assert resp.status == 400
    assert arrivals_count(registry, "malformed") == 1
    assert not logs.at(logging.ERROR)


@pytest.mark.parametrize("body", [DEEP, b'{"a":', b"\xff\xfe not even text"])
@pytest.mark.parametrize("forged", [True, False], ids=["forged", "unsigned"])
async def test_forged_or_unsigned_bodies_are_refused_before_they_are_parsed(
    listener: Listener, registry: CollectorRegistry, body: bytes, forged: bool
) -> None:
    """On a signed path the signature is checked on the raw bytes first: a forged or unsigned
    delivery is a 401 `bad_signature` whatever its body, never a 400 `malformed` (which would
    mean its JSON was read), and nothing reaches the correlator."""
    signature = StandardWebhooksSignature.model_validate(
        {"scheme": "standard_webhooks", "secret": SW_SECRET}
    )
    port = await listener(WebhookRoute(PATH, signature))
    headers = {"Content-Type": "application/json"}
    if forged:  # signed with another secret, otherwise well formed
        headers = standard_headers(body, "m-forged", secret="whsec_" + "QUFBQUFBQUFBQUFB" * 2)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}{PATH}", data=body, headers=headers) as resp,
    ):
        assert resp.status == 401
        assert "signature" in await resp.text()
    assert arrivals_count(registry, "bad_signature") == 1
    assert arrivals_count(registry, "malformed") == 0
    assert arrivals_count(registry, "unmatched") == 0  # never offered


async def test_parser_rejects_are_counted_and_logged_once_per_interval(
    listener: Listener, registry: CollectorRegistry, logs: _Records
) -> None:
    port = await listener(WebhookRoute(PATH, None))
    bad = b"POST /hooks/in HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n"
    oversized = b"POST /hooks/in HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    for data in (bad, oversized, bad):
        answer = await raw_exchange(port, data)
        assert answer.split(b" ")[1] == b"400", answer[:80]
    assert arrivals_count(registry, "malformed") == 3
    assert not logs.at(logging.ERROR)
    warnings = [r for r in logs.at(logging.WARNING) if "bad_request" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].exc_info is None


async def test_client_gone_mid_body_is_counted_without_a_traceback(
    listener: Listener, registry: CollectorRegistry, logs: _Records
) -> None:
    port = await listener(WebhookRoute(PATH, None))
    head = (
        b"POST /hooks/in HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    await raw_exchange(port, head + b'{"a": "' + b"x" * 70_000, close=True)
    async with asyncio.timeout(10):
        await logs.warned.wait()
    assert arrivals_count(registry, "malformed") == 1
    assert not logs.at(logging.ERROR)
    assert "disconnect" in logs.at(logging.WARNING)[0].getMessage()


async def test_a_slow_head_is_dropped_after_the_header_timeout(listener: Listener) -> None:
    port = await listener(WebhookRoute(PATH, None), header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /hooks/in HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        await writer.drain()
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the server, no answer
        assert 0.2 <= loop.time() - started < 3
    finally:
        writer.close()


async def test_a_slow_body_gets_408_after_the_body_timeout(
    listener: Listener, registry: CollectorRegistry
) -> None:
    port = await listener(WebhookRoute(PATH, None), body_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /hooks/in HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 50\r\n\r\n{"a":'
        )
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.read()
        assert answer.split(b" ")[1] == b"408", answer[:80]
    finally:
        writer.close()
    assert arrivals_count(registry, "malformed") == 1


async def test_broken_gzip_is_a_400(listener: Listener, registry: CollectorRegistry) -> None:
    port = await listener(WebhookRoute(PATH, None))
    body = b"\x1f\x8b\x08\x00garbage that is not deflate"
    head = (
        b"POST /hooks/in HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    answer = await raw_exchange(port, head + body)
    assert answer.split(b" ")[1] == b"400", answer[:80]
    assert arrivals_count(registry, "malformed") == 1


async def test_a_plain_delivery_still_passes(
    listener: Listener, registry: CollectorRegistry
) -> None:
    port = await listener(WebhookRoute(PATH, None))
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}{PATH}", json={"order": 1}) as resp,
    ):
        assert resp.status == 202
    assert arrivals_count(registry, "malformed") == 0
    assert json.dumps({"order": 1})  # the body was JSON: counted as an arrival, not refused


async def test_deliveries_skip_the_router_and_the_rest_keep_its_answers(
    correlator: Correlator, arrivals: Counter, registry: CollectorRegistry
) -> None:
    """The public runner hands a POST on a served path straight to its handler (guard.FRONT),
    without asking aiohttp's router; other paths and methods, and a request that waits for
    `100 Continue`, still go through it and get its answers."""
    rejects = RejectLog(arrivals)
    app = web.Application()
    install_webhook_routes(app, [WebhookRoute(PATH, None)], correlator, arrivals)
    asked: list[str] = []
    resolve = app.router.resolve

    async def counted(request: web.Request) -> Any:
        asked.append(f"{request.method} {request.path}")
        return await resolve(request)

    app.router.resolve = counted  # type: ignore[method-assign]
    runner = public_runner(app, rejects)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url + PATH, json={"order": 1}) as resp:
                assert resp.status == 202
            assert asked == []
            async with session.post(url + "/elsewhere", json={}) as resp:
                assert resp.status == 404
            async with session.get(url + PATH) as resp:
                assert resp.status == 405
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head)
            async with asyncio.timeout(10):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
                writer.write(b"{}")
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 202")
        finally:
            writer.close()
        assert asked == ["POST /elsewhere", f"GET {PATH}", f"POST {PATH}"]
        assert arrivals_count(registry, "unmatched") == 2
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "body",
    [
        b'{"ref": "hw-1"}',
        b"[1, 2.5, null]",
        b'{"a": "\xff"}',  # not UTF-8
        b'{"a": "\xed\xa0\x80"}',  # an encoded surrogate
        b'{"a": "\\ud800"}',
        b'{"a": 1} trailing',
        b'{"a": 1} \r\n\t ',  # trailing whitespace only
        b'{"a": 1}{"b": 2}',
        b"[1, 2,",
        b"{",
        '{"a": 1}'.encode("utf-16-le"),  # a NUL second byte: detected, not taken for UTF-8
        '{"a": 1}'.encode("utf-16"),
        b'\xef\xbb\xbf{"a": 1}',
        b" {}",
    ],
)
def test_untrusted_json_reads_bodies_as_json_loads_does(body: bytes) -> None:
    """`untrusted_json.loads` decodes the usual body (`{` or `[` first) itself: the same
    document, or a refusal, as `json.loads` on the bytes gives."""
    try:
        want: Any = ("doc", json.loads(body))
    except ValueError:
        want = ("refused",)
    try:
        got: Any = ("doc", untrusted_json.loads(body))
    except untrusted_json.NotJson:
        got = ("refused",)
    assert got == want


async def test_a_bug_in_handling_a_delivery_is_a_500_and_the_listener_serves_on(
    listener: Listener, logs: _Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery the public listener's own connection answers (`receivers.wire`) and our code
    fails on gets aiohttp's answer to a failing handler (500, the connection closed, the
    traceback logged), and the next connection is served."""
    port = await listener(WebhookRoute(PATH, None))
    accept = _PathHandler.accept
    calls = 0

    def failing_once(self: _PathHandler, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return accept(self, *args)

    monkeypatch.setattr(_PathHandler, "accept", failing_once)
    delivery = (
        b"POST /hooks/in HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    answer = await raw_exchange(port, delivery)  # read until the server closes
    assert answer.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), answer[:80]
    assert b"Connection: close\r\n" in answer
    assert any("a bug" in str(r.exc_info) for r in logs.at(logging.ERROR))
    again = await raw_exchange(port, delivery.replace(b"HTTP/1.1", b"HTTP/1.0"))
    assert again.startswith(b"HTTP/1.0 202 Accepted\r\n"), again[:80]
