"""The system under watch for the benchmarks: a minimal HTTP/1.1 server that is never the bottleneck
and knows the truth, i.e. how long it really held each request.

Bare non-blocking sockets on the event loop (no framework), so one core answers far more
requests than any monitor can send, read with recvmsg for the kernel's receive timestamps.
Routes:

    GET|POST /ok          200 {"ok":true} at once
    GET|POST /delay/<ms>  the same <ms> milliseconds after the request reached this host; the
                          time it really held the request (from the kernel's receive timestamp
                          of the head's first bytes to the answer's write) is kept, keyed by the
                          `id` query parameter or else the X-Hopwatch-Run header
    GET /truth            {"<key>": held_seconds, ...} of the /delay requests so far; then forgets
    GET /stats            {"requests": n, "cpu_s": process CPU seconds}
    GET /lag              how late this server's own loop woke up (sampled every 2 ms) since the
                          last /lag: {"max_ms", "stalls_over_10ms"}; then forgets. A stall here
                          holds requests longer, and the truth includes it (its clock is the
                          kernel's); a stall long enough to delay an answer past its time is
                          still the target's, and this says when that happened

Run: python -m benchmarks.target --port 8000 [--no-uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import socket
import struct
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


# Linux's SO_TIMESTAMPNS and its control message (the same number); Python 3.11's socket module
# lacks the name.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@ll")
_READ = 65536
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


def arrival_ns(ancillary: list[tuple[int, int, bytes]]) -> int:
    """When the kernel received the bytes just read (CLOCK_REALTIME ns), from recvmsg's control
    messages; now, when the kernel gave none."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return int(sec) * 1_000_000_000 + int(nsec)
    return time.time_ns()


class TargetConnection:
    """One client connection, read with recvmsg so every read carries the kernel's receive
    timestamp (SO_TIMESTAMPNS): the truth's clock starts when the request reached this host,
    not when this loop got round to reading it. A request that waited in the socket while this
    server's core woke up or was busy is the system's latency as a perfect client sees it; read
    with recv, that wait counted as the monitor's error."""

    def __init__(self, sock: socket.socket, state: State, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.state = state
        self.loop = loop
        self.buf = b""
        self.arrived_ns = 0  # kernel receive time of the buffered request's first bytes
        self.out = b""
        self.closing = False
        self.closed = False
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(_READ, _ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        stamp = arrival_ns(ancillary)
        if not self.buf:
            self.arrived_ns = stamp
        self.buf += data
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
            self.handle(head, lower, self.arrived_ns)
            self.arrived_ns = stamp  # a pipelined next request came in this read

    def handle(self, head: bytes, lower: bytes, arrived_ns: int) -> None:
        self.state.requests += 1
        close = _CLOSE_HEADER in lower
        target = head.split(b" ", 2)[1].decode()
        if target.startswith("/ok"):
            self.write(OK_CLOSE if close else OK_KEEP, close)
        elif target.startswith("/delay/"):
            self.delayed(target, lower, arrived_ns, close)
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

    def delayed(self, target: str, lower: bytes, arrived_ns: int, close: bool) -> None:
        parts = urlsplit(target)
        delay = float(parts.path.rsplit("/", 1)[1]) / 1000
        ids = parse_qs(parts.query).get("id")
        key = ids[0] if ids else (_header_value(lower, _RUN_HEADER) or b"").decode()

        def answer() -> None:
            # Stamped as the answer is handed to the kernel, not after: a write that returns
            # late (this process preempted, the loopback's softirq work) must not lengthen
            # the truth past what the client saw, which would flatter the monitor.
            if key:
                self.state.truth[key] = (time.time_ns() - arrived_ns) / 1e9
            self.write(OK_CLOSE if close else OK_KEEP, close)

        # Loop timers are about a millisecond exact; the truth is what was really held.
        waited = (time.time_ns() - arrived_ns) / 1e9
        self.loop.call_later(max(0.0, delay - waited), answer)

    def write(self, data: bytes, close: bool) -> None:
        if self.closed or self.closing:
            return
        self.closing = close
        if self.out:
            self.out += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        self.out = data[sent:]
        if self.out:
            self.loop.add_writer(self.sock.fileno(), self.writable)
        elif close:
            self.close()

    def writable(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.out = self.out[sent:]
        if not self.out:
            self.loop.remove_writer(self.sock.fileno())
            if self.closing:
                self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        if self.out:
            self.loop.remove_writer(self.sock.fileno())
        self.sock.close()


def _accept(listener: socket.socket, state: State, loop: asyncio.AbstractEventLoop) -> None:
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # e.g. out of file descriptors: the connection waits in the backlog
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        TargetConnection(sock, state, loop)


async def serve(port: int) -> None:
    state = State()
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # accepted sockets inherit it
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    loop.add_reader(listener.fileno(), _accept, listener, state, loop)
    watcher = asyncio.create_task(watch_lag(state))
    # A collection pause would delay answers past their time. This server makes no reference
    # cycles worth collecting (the loop holds a connection only through its reader and writer
    # callbacks, removed on close), so the collector is off for its short life.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        await asyncio.Event().wait()  # until the process is stopped
    finally:
        watcher.cancel()
        loop.remove_reader(listener.fileno())
        listener.close()


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
