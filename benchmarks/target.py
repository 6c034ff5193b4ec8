"""The system under watch for the benchmarks: a minimal HTTP/1.1 server that is never the bottleneck
and knows the truth, i.e. how long it really held each request.

A bare asyncio Protocol (no framework) so one core answers far more requests than any monitor
can send. Routes:

    GET|POST /ok          200 {"ok":true} at once
    GET|POST /delay/<ms>  the same after <ms> milliseconds; the time it really held the request
                          (first byte of the request's head to the answer's write) is kept,
                          keyed by the `id` query parameter or else the X-Hopwatch-Run header
    GET /truth            {"<key>": held_seconds, ...} of the /delay requests so far; then forgets
    GET /stats            {"requests": n, "cpu_s": process CPU seconds}
    GET /lag              how late this server's own loop woke up (sampled every 2 ms) since the
                          last /lag: {"max_ms", "stalls_over_10ms"}; then forgets. A stall here
                          delays requests before the truth's clock starts, so it shows up as
                          the monitor's error: this says when the target, not the monitor, lagged

Run: python -m benchmarks.target --port 8000 [--no-uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

OK_BODY = b'{"ok":true}'
_RUN_HEADER = b"\r\nx-hopwatch-run:"
_LENGTH_HEADER = b"\r\ncontent-length:"
_CLOSE_HEADER = b"\r\nconnection: close"


def _response(body: bytes, *, close: bool = False) -> bytes:
    conn = b"close" if close else b"keep-alive"
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: " + conn
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


OK_KEEP = _response(OK_BODY)
OK_CLOSE = _response(OK_BODY, close=True)


class State:
    def __init__(self) -> None:
        self.requests = 0
        self.truth: dict[str, float] = {}
        self.lag_max = 0.0
        self.stalls = 0

    def lag_report(self) -> dict[str, float]:
        report = {"max_ms": round(self.lag_max * 1000, 2), "stalls_over_10ms": self.stalls}
        self.lag_max, self.stalls = 0.0, 0
        return report


async def watch_lag(state: State, every: float = 0.002) -> None:
    loop = asyncio.get_running_loop()
    while True:
        planned = loop.time() + every
        await asyncio.sleep(every)
        lag = loop.time() - planned
        state.lag_max = max(state.lag_max, lag)
        if lag > 0.010:
            state.stalls += 1


def _header_value(lower_head: bytes, name: bytes) -> bytes | None:
    i = lower_head.find(name)
    if i < 0:
        return None
    start = i + len(name)
    end = lower_head.find(b"\r\n", start)
    return lower_head[start : end if end >= 0 else len(lower_head)].strip()


class TargetProtocol(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self.state = state
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        arrived = time.perf_counter()
        self.buf = self.buf + data if self.buf else data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            lower = head.lower()
            length = _header_value(lower, _LENGTH_HEADER)
            total = end + 4 + (int(length) if length else 0)
            if len(self.buf) < total:
                return
            self.buf = self.buf[total:]
            self.handle(head, lower, arrived)

    def handle(self, head: bytes, lower: bytes, arrived: float) -> None:
        self.state.requests += 1
        close = _CLOSE_HEADER in lower
        target = head.split(b" ", 2)[1].decode()
        if target.startswith("/ok"):
            self.write(OK_CLOSE if close else OK_KEEP, close)
        elif target.startswith("/delay/"):
            self.delayed(target, lower, arrived, close)
        elif target.startswith("/truth"):
            truth, self.state.truth = self.state.truth, {}
            self.write(_response(json.dumps(truth).encode(), close=close), close)
        elif target.startswith("/lag"):
            body = json.dumps(self.state.lag_report()).encode()
            self.write(_response(body, close=close), close)
        elif target.startswith("/stats"):
            stats = {"requests": self.state.requests, "cpu_s": time.process_time()}
            self.write(_response(json.dumps(stats).encode(), close=close), close)
        else:
            self.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", close)

    def delayed(self, target: str, lower: bytes, arrived: float, close: bool) -> None:
        parts = urlsplit(target)
        delay = float(parts.path.rsplit("/", 1)[1]) / 1000
        ids = parse_qs(parts.query).get("id")
        key = ids[0] if ids else (_header_value(lower, _RUN_HEADER) or b"").decode()

        def answer() -> None:
            self.write(OK_CLOSE if close else OK_KEEP, close)
            if key:
                self.state.truth[key] = time.perf_counter() - arrived

        # Loop timers are about a millisecond exact; the truth is what was really held.
        self.loop.call_later(max(0.0, delay - (time.perf_counter() - arrived)), answer)

    def write(self, data: bytes, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(data)
        if close:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int) -> None:
    state = State()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: TargetProtocol(state), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    watcher = asyncio.create_task(watch_lag(state))
    # The truth's clock starts when a request is read: a collection pause before that would
    # count as the monitor's error. This server makes no reference cycles worth collecting
    # (a connection drops its transport when lost), so the collector is off for its short life.
    gc.collect()
    gc.freeze()
    gc.disable()
    async with server:
        await server.serve_forever()
    watcher.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    runner: Any = asyncio.run
    if not args.no_uvloop:
        import uvloop

        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.port))


if __name__ == "__main__":
    main()
