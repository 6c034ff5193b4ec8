"""Property tests of the public listener and every signature parser: whatever a client sends
(headers, bodies, encodings, sizes, nesting, truncation), never a 5xx, never an exception
escaping, and every request to a webhook path counted exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import hmac
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter
from pydantic import TypeAdapter

from monitor.correlator import Correlator
from monitor.demo.broker import free_port
from monitor.receivers.guard import public_runner
from monitor.receivers.webhooks import WebhookRoute, install_webhook_routes
from monitor.rejects import RejectLog
from probes.signatures import SignatureConfig, SignatureError, VerifiedDelivery, verify
from tests.fixtures.webhooks import SW_SECRET, standard_headers

SECRET = "fuzz-secret-1234"
CONFIGS: dict[str, dict[str, Any]] = {
    "/u": {},
    "/sw": {"scheme": "standard_webhooks", "secret": SW_SECRET},
    "/stripe": {"scheme": "stripe", "secret": SECRET},
    "/gh": {"scheme": "github", "secret": SECRET},
    "/hmac": {
        "scheme": "hmac",
        "secret": SECRET,
        "header": "X-Sig",
        "encoding": "base64",
        "timestamp_header": "X-Ts",
        "delivery_id_header": "X-Id",
    },
}
# Every header some scheme reads: random values there reach each parser's own code.
SIGNATURE_HEADERS = [
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "Stripe-Signature",
    "X-Hub-Signature-256",
    "X-GitHub-Delivery",
    "X-Sig",
    "X-Ts",
    "X-Id",
]
SIGNATURES: TypeAdapter[SignatureConfig] = TypeAdapter(SignatureConfig)
# `make chaos` raises the counts (HOPWATCH_FUZZ_SCALE=20) and drops derandomize for new cases.
SCALE = int(os.environ.get("HOPWATCH_FUZZ_SCALE", "1"))
FAST = settings(
    max_examples=120 * SCALE,
    deadline=None,  # a 1 MB body on a shared CI core may take a while; the count is bounded
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=SCALE == 1,  # the same examples every run: a failure reproduces
)


class _Signalling:
    """A labelled Counter whose increments wake a waiting thread (the test's)."""

    def __init__(self, counter: Counter, changed: threading.Condition) -> None:
        self._counter = counter
        self._changed = changed

    def labels(self, **labels: str) -> _Signalling._Child:
        return _Signalling._Child(self._counter.labels(**labels), self._changed)

    class _Child:
        def __init__(self, child: Any, changed: threading.Condition) -> None:
            self._child = child
            self._changed = changed

        def inc(self, amount: float = 1.0) -> None:
            with self._changed:
                self._child.inc(amount)
                self._changed.notify_all()


class Listener:
    """The public listener on its own loop in a thread, so synchronous hypothesis examples can
    talk to it over real sockets."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        counter = Counter("hopwatch_arrivals", "a", ["source", "outcome"], registry=self.registry)
        self.changed = threading.Condition()
        self.counter: Any = _Signalling(counter, self.changed)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _start(self) -> Any:
        from aiohttp import web

        rejects = RejectLog(self.counter)
        app = web.Application()
        routes = [
            WebhookRoute(path, SIGNATURES.validate_python(raw) if raw else None)
            for path, raw in CONFIGS.items()
        ]
        install_webhook_routes(
            app,
            routes,
            Correlator(self.counter),
            self.counter,
            body_timeout=2.0,
            reject_log=rejects,
        )
        runner = public_runner(app, rejects, header_timeout=2.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        return runner

    def __enter__(self) -> Listener:
        self._thread.start()
        self._runner = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def total(self) -> float:
        return sum(
            s.value
            for metric in self.registry.collect()
            for s in metric.samples
            if s.name == "hopwatch_arrivals_total"
        )

    def wait_total(self, want: float, within: float = 10.0) -> float:
        with self.changed:
            self.changed.wait_for(lambda: self.total() >= want, timeout=within)
            return self.total()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    with Listener() as running:
        yield running


def _json_docs() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["json", "bytes", "deep", "truncated_json", "utf16", "big"]))
    if kind == "json":
        return json.dumps(draw(_json_docs())).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=2000))
    if kind == "deep":
        # hypothesis favours small integers: name the depths around the limit and far past it
        depth = draw(st.sampled_from([1, 100, 101, 1_000, 10_000, 50_000]) | st.integers(1, 20_000))
        opener = draw(st.sampled_from([b"[", b'{"a":']))
        closer = b"]" if opener == b"[" else b"}"
        return opener * depth + b"1" + closer * depth
    if kind == "truncated_json":
        text = json.dumps(draw(_json_docs())).encode()
        return text[: draw(st.integers(0, len(text)))]
    if kind == "utf16":
        return json.dumps(draw(_json_docs())).encode("utf-16")
    return b'{"a": "' + b"x" * draw(st.sampled_from([1024 * 1024 - 20, 1024 * 1024 + 1])) + b'"}'


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-ABCDEFXYZ0123456789", min_size=1, max_size=20)
_RESERVED = {"content-length", "transfer-encoding", "connection", "host", "content-encoding"}


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    """(path, raw request bytes, whether the client hangs up before the body is whole)."""
    path = draw(st.sampled_from(sorted(CONFIGS)))
    body = draw(bodies())
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["Content-Type"] = draw(
            st.sampled_from(["application/json", "text/plain", "application/x+json", "", "a/"])
        )
    if path == "/sw" and draw(st.booleans()):
        headers.update(standard_headers(body, draw(_TOKEN)))  # valid: the JSON is parsed
    names = st.sampled_from(SIGNATURE_HEADERS) | _TOKEN.filter(lambda n: n.lower() not in _RESERVED)
    values = st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200
    ) | st.sampled_from(["t=1,v1=00", "v1,AAAA", "sha256=zz", "t=abc", "v1", ",,,", "=" * 50])
    headers.update(draw(st.dictionaries(names, values, max_size=8)))
    if draw(st.booleans()):
        body = gzip.compress(body) if draw(st.booleans()) else b"\x1f\x8b" + body
        headers["Content-Encoding"] = "gzip"
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += f"Content-Length: {len(body)}\r\n"
    raw_headers = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    if draw(st.integers(0, 9)) == 0:  # a header line the parser must refuse
        raw_headers += draw(st.sampled_from(["Bad Line\r\n", "X:\x01\r\n", ": empty\r\n"]))
    data = (head + raw_headers + "\r\n").encode("latin-1") + body
    truncate = draw(st.integers(0, 7)) == 0 and len(body) > 0
    if truncate:
        data = data[: len(data) - draw(st.integers(1, len(body)))]
    return path, data, truncate


def exchange(port: int, data: bytes, hang_up: bool) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # The server may answer (413, 400) and close before it read everything.
        with contextlib.suppress(OSError):
            sock.sendall(data)
        if hang_up:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@FAST
@given(request=requests())
@example(  # found by the fuzzer: aiohttp answers 417 before any handler; it was not counted
    request=(
        "/gh",
        b"POST /gh HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Length: 4\r\nexpect: 00000\r\n\r\nnull",
        False,
    )
)
def test_every_request_is_answered_below_500_and_counted_once(
    listener: Listener, request: tuple[str, bytes, bool]
) -> None:
    _, data, hang_up = request
    before = listener.total()
    try:
        answer = exchange(listener.port, data, hang_up)
    except ConnectionResetError:
        answer = b""  # refused mid-send: still counted below
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert 200 <= status < 500, answer[:200]
    after = listener.wait_total(before + 1)
    assert after == before + 1, (after - before, data[:200])


# -- every signature parser, on its own ------------------------------------------------------


@st.composite
def signed_inputs(draw: st.DrawFn) -> tuple[str, CIMultiDict[str], bytes, float]:
    path = draw(st.sampled_from([p for p in CONFIGS if CONFIGS[p]]))
    body = draw(bodies())
    now = time.time()
    names = st.sampled_from(SIGNATURE_HEADERS)
    values = st.text(max_size=300) | st.sampled_from(
        ["t=1,v1=", "t=,v1=x", "v1,", "v1a,xyz", "sha256=", "999999999999999999999", "nan", "-1"]
    )
    headers: CIMultiDict[str] = CIMultiDict(draw(st.dictionaries(names, values, max_size=6)))
    if draw(st.booleans()):  # a valid signature, so what follows verification runs too
        stamp = str(int(now))
        if path == "/stripe":
            mac = hmac.new(SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256)
            headers["Stripe-Signature"] = f"t={stamp},v1={mac.hexdigest()}"
        elif path == "/gh":
            mac = hmac.new(SECRET.encode(), body, hashlib.sha256)
            headers["X-Hub-Signature-256"] = "sha256=" + mac.hexdigest()
        elif path == "/sw":
            headers.update(standard_headers(body, "m1"))
    return path, headers, body, now


@settings(max_examples=400 * SCALE, deadline=None, derandomize=SCALE == 1)
@given(case=signed_inputs())
def test_signature_parsers_only_ever_verify_or_refuse(
    case: tuple[str, CIMultiDict[str], bytes, float],
) -> None:
    path, headers, body, now = case
    config = SIGNATURES.validate_python(CONFIGS[path])
    try:
        verified = verify(config, headers, body, now)
    except SignatureError as exc:
        assert exc.message
    else:
        assert isinstance(verified, VerifiedDelivery)
