"""The http kinds' own HTTP/1.1 client for plain requests: asyncio protocols parsed by httptools
(llhttp, the parser Node.js uses), with the same phases, the same bytes on the wire and the same
failure reasons as the aiohttp path in probes/http_common.py.

Why a client of our own: aiohttp's client spends ~85 µs of CPU on a kept-alive request and
~150 µs more than this one on a fresh one (a session, a request and a response object, a
connection key, a stream reader, trace hooks and a dozen coroutines each), where the whole
scheduled check is meant to cost less than blackbox_exporter's. This one keeps just what a
probe needs: write the request, parse the answer in `data_received`, stamp arrival there.

It serves GET, POST, PUT, PATCH, DELETE and OPTIONS to http(s) URLs without credentials in
them. Redirects, HEAD and per-run cookies still go through aiohttp, as does any URL it does
not take (`WirePool.send` returns None for those before doing anything).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohappyeyeballs
import aiohttp
import httptools
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from probes.errors import ConnectError, DnsError, OtherFailure, StepFailed, TlsError, drop_frames
from probes.http_common import (
    PhaseTimer,
    Response,
    TimedResolver,
    _counted_socket,
    handshake_rtt,
)
from probes.tls_cert import not_after

# What aiohttp adds to every request unless the step set it, so both paths send the same.
_DEFAULTS: Final = tuple(aiohttp.ClientRequest.DEFAULT_HEADERS.items())
_POST_METHODS: Final = frozenset(aiohttp.ClientRequest.POST_METHODS)
_NO_BODY_METHODS: Final = frozenset(aiohttp.ClientRequest.GET_METHODS)
_IDEMPOTENT: Final = frozenset({"GET", "OPTIONS", "PUT", "DELETE"})
_HAPPY_EYEBALLS_DELAY: Final = 0.25  # aiohttp's default
KEEPALIVE_S: Final = 15.0  # an idle kept connection is closed after this long (aiohttp's default)
DNS_TTL_S: Final = 10.0  # kept-alive pools cache lookups this long (aiohttp's default)
# Control characters aiohttp refuses in a header (RFC 9110 5.5): a rendered value cannot add one.
_FORBIDDEN: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_FAMILIES: Final[dict[int, int]] = {4: socket.AF_INET, 6: socket.AF_INET6}
_TCP: Final = socket.IPPROTO_TCP
_TARGETS_MAX: Final = 4096  # parsed URLs kept; URLs rendered per run may all differ


class WireError(Exception):
    """A failure of the connection or of the answer, before it becomes a StepFailed."""


class Disconnected(WireError):
    """The server closed the connection before the answer's head was in."""


class BrokeMidResponse(WireError):
    """The connection closed, or the body did not decode, after the head was in."""


class Unparsable(WireError):
    """The answer is not HTTP/1.x (httptools' error)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A rendered URL, parsed once: where to connect and the request's first lines."""

    origin: tuple[str, int, bool]  # host (no brackets, no trailing dot), port, TLS
    ip_family: int  # the socket family of a host that is an IP literal, else 0
    head: bytes  # "METHOD target HTTP/1.1\r\nHost: …\r\n"


class WireConnection(asyncio.Protocol):
    """One HTTP/1.1 connection: writes a request, parses its answer as the bytes come, stamps
    when the connection was made and when the answer's first and last bytes arrived (the loop
    runs these callbacks as soon as the socket is ready; the request's task resumes later, after
    whatever is queued ahead of it: that wait is the monitor's, not the target's)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.ssl_object: Any = None  # its TLS state, when it speaks TLS (the server's certificate)
        # None once the connection is gone: the parser holds this protocol's methods, a cycle
        # that only the garbage collector would otherwise free.
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.made_at = 0.0
        self.data_at = 0.0  # the answer's first bytes
        self.end_at = 0.0  # its last
        self.now = 0.0
        self.waiter: asyncio.Future[None] | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.status = 0
        self.head_in = False
        self.done = False
        self.keep_alive = False
        self.lost = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made_at = time.monotonic()  # TCP (and TLS, when asked for) established
        self.transport = transport  # type: ignore[assignment]
        self.ssl_object = transport.get_extra_info("ssl_object")

    def start(self, request: bytes) -> asyncio.Future[None]:
        """Send `request`; the future is done when its whole answer is in."""
        self.waiter = waiter = asyncio.get_running_loop().create_future()
        if self.transport is None:  # closed by the server before the task got round to it
            waiter.set_exception(Disconnected("Server disconnected"))
            return waiter
        self.data_at = self.end_at = 0.0
        self.headers, self.chunks, self.status = [], [], 0
        self.head_in = self.done = False
        self.transport.write(request)
        return waiter

    def data_received(self, data: bytes) -> None:
        self.now = now = time.monotonic()
        if self.waiter is None or self.done:  # nothing asked for it: not an answer to trust
            self.lost = True
            if self.transport is not None:
                self.transport.close()
            return
        if not self.data_at:
            self.data_at = now
        parser = self.parser
        if parser is None:
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.lost = True  # a 101: the answer is its head; the connection is not HTTP now
            self._finish()
        except httptools.HttpParserError as exc:
            self._fail(Unparsable(str(exc) or type(exc).__name__))

    # httptools' callbacks, from inside feed_data
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("utf-8", "surrogateescape"),
                             value.decode("utf-8", "surrogateescape")))  # fmt: skip

    def on_headers_complete(self) -> None:
        assert self.parser is not None  # called from its feed_data
        self.status = self.parser.get_status_code()
        self.head_in = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim answer (103 Early Hints): the real one follows
            self.headers, self.chunks, self.head_in = [], [], False
            return
        self._finish()

    def _finish(self) -> None:
        self.end_at = self.now
        self.done = True
        # read here: once feed_data has returned, httptools says False whatever the answer said
        parser = self.parser
        self.keep_alive = not self.lost and parser is not None and parser.should_keep_alive()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self.lost = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.done:
            if self.head_in and self._until_close():
                self.now = time.monotonic()
                self._finish()  # a body that ends where the connection does
            elif self.head_in:
                self._fail(BrokeMidResponse(f"connection closed mid-body: {exc or 'EOF'}"))
            else:
                self._fail(Disconnected("Server disconnected"))
        self.parser = self.transport = self.waiter = None  # no cycles left for the collector

    def _until_close(self) -> bool:
        """The answer has neither a length nor chunks: its body ends with the connection."""
        for name, value in self.headers:
            lower = name.lower()
            if lower == "content-length" or (lower == "transfer-encoding" and value):
                return False
        return True

    def reusable(self) -> bool:
        return not self.lost and self.done and self.keep_alive

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class WirePool:
    """Connections by origin for one TLS setting. `keep`: answered connections wait here for
    the next request (kept-alive runs, or one run's steps); otherwise each request has its own
    connection and asks the server to close it (`Connection: close`, as aiohttp does for
    connections it will not keep)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        resolver: TimedResolver,
        keep: bool,
        dns_ttl: float | None,
    ) -> None:
        self._ssl = ssl_context
        self._resolver = resolver
        self._keep = keep
        self._dns_ttl = dns_ttl
        self._dns: dict[tuple[str, int], tuple[float, list[Any]]] = {}
        self._idle: dict[tuple[str, int, bool], list[WireConnection]] = {}
        self._targets: dict[tuple[str, str], Target] = {}
        self._swept = time.monotonic()

    async def send(
        self,
        timer: PhaseTimer,
        method: str,
        url: str,
        headers: Mapping[str, str],
        params: dict[str, str] | None,
        data: bytes | None,
    ) -> Response | None:
        """The answer to one request, timed on `timer`; None when the URL is not one this
        client takes (the caller sends it through aiohttp). Failures are StepFailed."""
        target = self._target(method, url, params)
        rest = self._rest(method, headers, data) if target is not None else None
        if target is None or rest is None:
            return None
        request = target.head + rest
        try:
            return await self._exchange(timer, target, request, method in _IDEMPOTENT)
        except (WireError, OSError) as exc:  # OSError: refused, reset, TLS (ssl.SSLError)
            raise _translate(exc, url, timer.phases()) from exc

    def _target(self, method: str, url: str, params: dict[str, str] | None) -> Target | None:
        key = (method, url)
        target = self._targets.get(key) if params is None else None
        if target is not None:
            return target
        try:
            parsed = URL(url)
            if params:
                parsed = parsed.extend_query(params)
        except (ValueError, TypeError):
            return None  # aiohttp says what is wrong with it
        raw_host = parsed.raw_host
        if parsed.scheme not in ("http", "https") or not raw_host or parsed.raw_user:
            return None
        if parsed.raw_fragment:
            parsed = parsed.with_fragment(None)
        host = raw_host.rstrip(".")
        try:
            family = _FAMILIES[ipaddress.ip_address(host).version]
        except ValueError:
            family = 0
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        # yarl has percent-encoded the path and checked the host: no line breaks in either
        head = (
            f"{method} {parsed.raw_path_qs} HTTP/1.1\r\nHost: {parsed.host_port_subcomponent}\r\n"
        )
        target = Target((host, port, parsed.scheme == "https"), family, head.encode())
        if params is None:
            if len(self._targets) >= _TARGETS_MAX:
                self._targets.clear()
            self._targets[key] = target
        return target

    def _rest(self, method: str, headers: Mapping[str, str], data: bytes | None) -> bytes | None:
        """The request's other headers, in aiohttp's order, then its body; None when the step
        sets its own Host (aiohttp's path puts it in place of the URL's)."""
        # Merged as aiohttp's session merges them: names alike but for case are one header,
        # where the first stood, named and valued as the last.
        merged = {name.lower(): f"{name}: {value}" for name, value in headers.items()}
        if "host" in merged:
            return None
        lines = list(merged.values())
        if _FORBIDDEN.search("".join(lines)) is not None:
            raise ValueError(
                "Forbidden control character detected in headers. "
                "Potential header injection attack."
            )
        seen = merged.keys()
        for name, value in _DEFAULTS:
            if name.lower() not in seen:
                lines.append(f"{name}: {value}")
        if "user-agent" not in seen:
            lines.append(f"User-Agent: {SERVER_SOFTWARE}")
        if data is not None:
            if "content-length" not in seen:
                lines.append(f"Content-Length: {len(data)}")
        elif method not in _NO_BODY_METHODS and "content-length" not in seen:
            lines.append("Content-Length: 0")
        if (data is not None or method in _POST_METHODS) and "content-type" not in seen:
            lines.append("Content-Type: application/octet-stream")
        if not self._keep and "connection" not in seen:
            lines.append("Connection: close")
        lines.append("\r\n")
        return "\r\n".join(lines).encode() + (data or b"")

    async def _exchange(
        self, timer: PhaseTimer, target: Target, request: bytes, retry: bool
    ) -> Response:
        if timer.sent is None:
            timer.start = time.monotonic()  # reaching for a connection, as TimedConnector does
        conn = self._take(target.origin)
        kept = conn is not None
        if conn is None:
            conn = await self._connect(timer, target)
        timer.sent = time.monotonic()
        if timer.ready is not None:
            timer.waited += max(0.0, timer.sent - timer.ready)
            timer.ready = None
        waiter = conn.start(request)
        try:
            await waiter
        except Disconnected:
            if kept and retry:  # the server closed it while it sat idle: once more, anew
                return await self._exchange(timer, target, request, False)
            raise
        except BaseException:
            conn.close()  # cancelled (the step's time ran out) or failed: never reused
            raise
        timer.response_start, timer.end = conn.data_at, conn.end_at
        status, raw_headers, chunks = conn.status, conn.headers, conn.chunks
        tls_not_after = not_after(conn.ssl_object)
        if self._keep and conn.reusable():
            self._put(target.origin, conn)
        else:
            conn.close()
        headers = CIMultiDictProxy(CIMultiDict(raw_headers))
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        encoding = headers.get("Content-Encoding")
        if encoding and body:
            body = _decoded(body, encoding)
        return Response(
            status=status,
            headers=headers,
            body=body,
            latency_s=timer.latency,
            phases=timer.phases(),
            tls_not_after=tls_not_after,
        )

    def _take(self, origin: tuple[str, int, bool]) -> WireConnection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if _usable(conn, now):
                return conn
            conn.close()
        return None

    def _put(self, origin: tuple[str, int, bool], conn: WireConnection) -> None:
        conn.idle_since = now = time.monotonic()
        conn.waiter = None
        self._idle.setdefault(origin, []).append(conn)
        if now - self._swept > KEEPALIVE_S:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close what has idled past the keep-alive time (a removed flow's connections)."""
        self._swept = now
        for origin, idle in list(self._idle.items()):
            keep = []
            for conn in idle:
                if _usable(conn, now):
                    keep.append(conn)
                else:
                    conn.close()
            if keep:
                self._idle[origin] = keep
            else:
                del self._idle[origin]

    async def _connect(self, timer: PhaseTimer, target: Target) -> WireConnection:
        """A new connection, its phases marked on `timer` as TimedConnector marks them. The
        caller has set the timer in `_current_timer`, where the socket factory and the TLS
        context find it."""
        timer.conn_start = time.monotonic()
        timer.attempts = 0
        host, _, tls = target.origin
        infos = await self._addresses(timer, target)
        loop = asyncio.get_running_loop()
        sock = await aiohappyeyeballs.start_connection(
            infos, happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY, socket_factory=_counted_socket
        )
        try:
            _, conn = await loop.create_connection(
                WireConnection,
                sock=sock,
                ssl=self._ssl if tls else None,
                server_hostname=host if tls else None,
            )
        except BaseException:
            sock.close()
            raise
        made = conn.made_at
        timer.conn_end = timer.ready = made if made >= timer.conn_start else time.monotonic()
        timer.handshake = handshake_rtt(timer.sock) if timer.attempts == 1 else None
        if timer.handshake is not None:  # what the loop saw beyond the handshake was its own
            timer.waited += max(0.0, timer.observed_connect() - timer.handshake)
        return conn

    async def _addresses(self, timer: PhaseTimer, target: Target) -> list[Any]:
        host, port, _ = target.origin
        if target.ip_family:
            addr = (host, port, 0, 0) if target.ip_family == socket.AF_INET6 else (host, port)
            return [(target.ip_family, socket.SOCK_STREAM, _TCP, "", addr)]
        key = (host, port)
        if self._dns_ttl is not None:
            cached = self._dns.get(key)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
        timer.dns_start = time.monotonic()
        try:
            hosts = await self._resolver.resolve(host, port, socket.AF_UNSPEC)
        except OSError as exc:
            raise _DnsFailed(exc) from exc
        finally:
            timer.dns_end = time.monotonic()
        infos: list[Any] = []
        for h in hosts:  # as aiohttp's connector turns them into addresses to connect to
            ip = h["host"]
            if ":" in ip:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, _TCP, "", (ip, h["port"], 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, _TCP, "", (ip, h["port"])))
        if self._dns_ttl is not None:
            self._dns[key] = (time.monotonic() + self._dns_ttl, infos)
        return infos

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _usable(conn: WireConnection, now: float) -> bool:
    """An idle connection still open and within the keep-alive time."""
    return not conn.lost and now - conn.idle_since < KEEPALIVE_S


class _DnsFailed(WireError):
    def __init__(self, exc: OSError) -> None:
        super().__init__(str(exc))
        self.os_error = exc


def _decoded(body: bytes, encoding: str) -> bytes:
    """The body as aiohttp's auto_decompress would give it: gzip and deflate (zlib-wrapped or
    raw) here; any other coding stays as sent, which is all aiohttp asks for without brotli."""
    coding = encoding.strip().lower()
    if coding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif coding == "deflate":
        wbits = zlib.MAX_WBITS if body[0] & 0x0F == 8 else -zlib.MAX_WBITS
    else:
        return body
    try:
        decompressor = zlib.decompressobj(wbits=wbits)
        return decompressor.decompress(body) + decompressor.flush()
    except zlib.error as exc:
        raise BrokeMidResponse(f"Can not decode content-encoding: {coding}: {exc}") from exc


def _translate(exc: BaseException, url: str, phases: dict[str, float]) -> StepFailed:
    """The wire client's failures in the reason vocabulary, worded as translate() words
    aiohttp's."""
    drop_frames(exc)
    if isinstance(exc, _DnsFailed):
        return DnsError(f"cannot resolve {url}: {exc.os_error}", phases=phases)
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return TlsError(f"TLS to {url}: {exc}", phases=phases)
    if isinstance(exc, Disconnected):
        return ConnectError(f"connection to {url} failed: {exc}", phases=phases)
    if isinstance(exc, BrokeMidResponse):
        return ConnectError(f"connection to {url} broke mid-response: {exc}", phases=phases)
    if isinstance(exc, OSError):
        return ConnectError(f"cannot connect to {url}: {exc}", phases=phases)
    return OtherFailure(f"request to {url} failed: {type(exc).__name__}: {exc}", phases=phases)
