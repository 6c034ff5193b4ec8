"""What the HTTP kinds share: request config, TLS contexts, phase timing hooks, error translation.

aiohttp's exceptions are translated to the reason vocabulary here and only here.
"""

from __future__ import annotations

import _socket
import asyncio
import base64
import contextvars
import functools
import json
import socket
import ssl
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_proto import ResponseHandler
from aiohttp.resolver import DefaultResolver
from pydantic import BaseModel, ConfigDict, Field, model_validator

from probes.base import StepContext
from probes.checks import Expect, ExtractRule
from probes.durations import Duration
from probes.errors import (
    AssertionFailed,
    ConnectError,
    DnsError,
    ExtractFailed,
    HttpStatusError,
    OtherFailure,
    StepFailed,
    Timeout,
    TlsError,
    drop_frames,
)
from probes.tls_cert import not_after

# What an HTTP step can report: never a webhook's or a topic's reasons.
HTTP_FAILURES: tuple[type[StepFailed], ...] = (
    Timeout, DnsError, ConnectError, TlsError, HttpStatusError, AssertionFailed, ExtractFailed,
    OtherFailure,
)  # fmt: skip

# The phases of a request in the order they happen (PhaseTimer.phases' keys).
PHASES: Final = ("dns", "connect", "tls", "processing", "transfer")

_current_timer: contextvars.ContextVar[PhaseTimer | None] = contextvars.ContextVar(
    "hopwatch_phase_timer", default=None
)


@dataclass(slots=True)
class PhaseTimer:
    """Monotonic marks of one request's phases, set by TimedConnector, TimedResolver and
    TimedSSLContext through the `_current_timer` context variable.

    `start` is moved to when the request reaches for a connection (before DNS and connect):
    building the request object is the monitor's own CPU, not the system's latency, and it
    allocates enough to trigger garbage collections that would land inside the timing. For
    the same reason `waited`, the time between a new connection being made (the protocol's
    `connection_made`) and the request's task resuming to send on it, is the monitor's own
    and left out of `latency`; on a loaded loop it was most of a fresh check's error.

    `handshake` is the TCP handshake's round trip as the kernel timed it (`handshake_rtt`).
    The loop learns of a finished connect only when it gets round to it, behind every other
    run's work, so the connect it observes is the handshake plus the monitor's own wait; with
    the kernel's figure, the connect phase is the network's and the rest goes to `waited`.
    Only when one attempt made the connection: after a refused or slow first address (happy
    eyeballs), the time spent on it is the client's too, and the loop's figure stands.
    """

    start: float = 0.0
    dns_start: float | None = None
    dns_end: float | None = None
    conn_start: float | None = None
    tls_start: float | None = None
    conn_end: float | None = None
    handshake: float | None = None  # the kernel's round trip of the TCP handshake
    attempts: int = 0  # sockets made for the last connection (one per address tried)
    sock: socket.socket | None = None  # the last of them
    ready: float | None = None  # a new connection was made, not yet sent on
    sent: float | None = None  # the request's task got its connection (and writes at once)
    waited: float = 0.0
    response_start: float | None = None
    end: float | None = None
    proto: TimedResponseHandler | None = None  # the connection the request went out on
    ssl_object: Any = None  # its TLS state, when it speaks TLS (the server's certificate)

    @property
    def latency(self) -> float:
        end = self.end if self.end is not None else time.monotonic()
        return end - self.start - self.waited

    def phases(self) -> dict[str, float]:
        """dns · connect · tls · processing · transfer in seconds, for the phases that happened.

        Processing runs from the request being sent on its connection to the response's head
        reaching the protocol.
        """
        out: dict[str, float] = {}
        if self.dns_start is not None and self.dns_end is not None:
            out["dns"] = self.dns_end - self.dns_start
        if self.conn_start is not None and self.conn_end is not None:
            connect = self.observed_connect()
            out["connect"] = connect if self.handshake is None else min(connect, self.handshake)
            if self.tls_start is not None:
                out["tls"] = self.conn_end - self.tls_start
        if self.response_start is not None:
            sent = self.sent if self.sent is not None else self.start
            out["processing"] = max(0.0, self.response_start - sent)
            if self.end is not None:
                out["transfer"] = self.end - self.response_start
        return out

    def observed_connect(self) -> float:
        """Connect as the loop saw it: from reaching for a connection (less DNS) to the TCP
        connection being made (the TLS handshake's start, when there is one)."""
        if self.conn_start is None or self.conn_end is None:
            return 0.0
        tcp_end = self.tls_start if self.tls_start is not None else self.conn_end
        dns = 0.0
        if self.dns_start is not None and self.dns_end is not None:
            dns = self.dns_end - self.dns_start
        return max(0.0, tcp_end - self.conn_start - dns)


# struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, then u32s; tcpi_rtt is the 16th u32
# (microseconds, the smoothed round trip: after a handshake, the SYN to SYN-ACK time) and
# tcpi_total_retrans the 24th. Both have been at these offsets since Linux 2.6.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_INFO_RTT_AND_RETRANS = struct.Struct("=60xI28xI")  # offsets 68 and 100 from byte 8
_TCP_INFO_LEN: Final = 104
# A socket's family as the int it is: `socket.socket.family` makes an enum of it (0.7 µs).
socket_family: Callable[[socket.socket], int] = _socket.socket.family.__get__


def handshake_rtt(sock: socket.socket | None) -> float | None:
    """The round trip of a connected socket's TCP handshake in seconds, as the kernel measured
    it (Linux `TCP_INFO`), taken just after connecting; None where the kernel cannot say, or
    when a segment was retransmitted (a lost SYN: then the loop's figure, seconds long, is
    right). The socket is the one `_counted_socket` made: the event loop's stand-in for it
    costs four times as much per call."""
    if (
        _TCP_INFO is None
        or sock is None
        or socket_family(sock) not in (socket.AF_INET, socket.AF_INET6)
    ):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except (OSError, ValueError):
        return None
    return parse_handshake_rtt(raw)


def parse_handshake_rtt(raw: bytes) -> float | None:
    """`handshake_rtt`'s reading of a `struct tcp_info`."""
    if len(raw) < _TCP_INFO_LEN:
        return None
    rtt_us, retransmitted = _TCP_INFO_RTT_AND_RETRANS.unpack_from(raw, 8)
    if retransmitted or rtt_us == 0:
        return None
    return float(rtt_us) / 1e6


class TimedSSLContext(ssl.SSLContext):
    """An SSL context that marks when the TLS handshake starts, splitting TCP connect from TLS.

    asyncio (and uvloop) call `wrap_bio` as the TCP connection is made; the request's timer
    reaches it through a context variable copied into the transport's callbacks.
    """

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        timer = _current_timer.get()
        if timer is not None:
            timer.tls_start = time.monotonic()
        return super().wrap_bio(*args, **kwargs)


class TlsConfig(BaseModel):
    """TLS client settings; verification is on unless switched off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    verify: bool = Field(default=True, description="Verify the server certificate; default true.")
    ca_file: str | None = Field(default=None, description="CA bundle (PEM); default: system CAs.")
    cert_file: str | None = Field(
        default=None, description="Client certificate (PEM); default none."
    )
    key_file: str | None = Field(default=None, description="Client key (PEM); default none.")


def build_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """Build once per distinct TlsConfig (the engine caches it); loading CAs is costly."""
    ctx = TimedSSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.verify:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if tls.ca_file:
            ctx.load_verify_locations(cafile=tls.ca_file)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


class TimedResolver(AbstractResolver):
    """Wraps aiohttp's default resolver to time real lookups (not cache hits, not literal IPs).

    aiohttp runs a lookup in a task created inside the request, so the task's copied context
    still holds the request's timer.
    """

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        timer = _current_timer.get()
        if timer is not None:
            timer.dns_start = time.monotonic()
        try:
            return await self._inner.resolve(host, port, family)
        finally:
            if timer is not None:
                timer.dns_end = time.monotonic()

    async def close(self) -> None:
        await self._inner.close()


class TimedResponseHandler(ResponseHandler):
    """aiohttp's connection protocol, stamping when the connection is made and when response
    bytes reach it.

    The loop calls `connection_made` and `data_received` as soon as it sees the socket ready;
    the request's task resumes only after every callback already queued has run. Under load
    that wait is the monitor's, not the target's, so the connection and the response's head
    and end are timed here (tests/test_http.py checks that a busy loop is not reported).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.data_at = 0.0
        self.made_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made_at = time.monotonic()  # TCP (and TLS, when asked for) established
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if data:
            self.data_at = time.monotonic()
        super().data_received(data)


def _counted_socket(addr_info: AddrInfoType) -> socket.socket:
    """aiohttp's socket factory: the socket it would make, counted on the request's timer."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    timer = _current_timer.get()
    if timer is not None:
        timer.attempts += 1
        timer.sock = sock
    return sock


class TimedConnector(aiohttp.TCPConnector):
    """Marks when a new connection starts and is ready (TCP and TLS) on the request's timer,
    and makes connections whose protocol stamps response arrival (TimedResponseHandler).

    This replaces aiohttp's TraceConfig hooks: those cost a dozen coroutine calls on every
    request, reused connection or not (13 % of a reused-connection check's instructions);
    `connect` takes the start and send marks, the rest costs nothing unless a connection is
    made. `_create_connection` and `_factory` are aiohttp's private hooks (stable since 3.0,
    aiohttp is capped below 4); tests/test_http.py fails if they change.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(socket_factory=_counted_socket, **kwargs)
        factory = functools.partial(TimedResponseHandler, loop=self._loop)
        self._factory = cast("functools.partial[ResponseHandler]", factory)

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        timer = _current_timer.get()
        if timer is not None and timer.sent is None:  # the first hop, if redirects follow
            timer.start = time.monotonic()
        conn = await super().connect(req, traces, timeout)
        if timer is None:
            return conn
        timer.sent = time.monotonic()
        if timer.ready is not None:
            timer.waited += max(0.0, timer.sent - timer.ready)
            timer.ready = None
        if isinstance(conn.protocol, TimedResponseHandler):
            conn.protocol.data_at = 0.0  # what arrives from now on answers this request
            timer.proto = conn.protocol
        if conn.transport is not None:  # read now: a small answer releases the connection early
            timer.ssl_object = conn.transport.get_extra_info("ssl_object")
        return conn

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        timer = _current_timer.get()
        if timer is None:
            return await super()._create_connection(req, traces, timeout)
        timer.conn_start = time.monotonic()
        timer.attempts = 0  # of this connection (a redirect may make another)
        proto = await super()._create_connection(req, traces, timeout)
        made = proto.made_at if isinstance(proto, TimedResponseHandler) else 0.0
        timer.conn_end = timer.ready = made if made >= timer.conn_start else time.monotonic()
        timer.handshake = handshake_rtt(timer.sock) if timer.attempts == 1 else None
        if timer.handshake is not None:  # what the loop saw beyond the handshake was its own
            timer.waited += max(0.0, timer.observed_connect() - timer.handshake)
        return proto


class BasicAuth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    username: str = Field(description="User name (templates allowed).")
    password: str = Field(description="Password; use a ${env:NAME} or ${file:path} reference.")


class Auth(BaseModel):
    """One of basic or bearer."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    basic: BasicAuth | None = Field(default=None, description="HTTP basic auth; default none.")
    bearer: str | None = Field(
        default=None, description="Bearer token; use a ${env:NAME} reference; default none."
    )

    @model_validator(mode="after")
    def _one(self) -> Auth:
        if (self.basic is None) == (self.bearer is None):
            raise ValueError("give exactly one of basic, bearer")
        return self


class RequestConfig(BaseModel):
    """The request part shared by `http` and `http_poll`."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] = Field(
        default="GET", description="HTTP method; default GET."
    )
    url: str = Field(description="URL template, e.g. {{ variant.base_url }}/orders.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra headers; default none."
    )
    query: dict[str, str] = Field(
        default_factory=dict, description="Query parameters; default none."
    )
    json_: Any = Field(default=None, alias="json", description="JSON body template; default none.")
    body: str | None = Field(default=None, description="Raw body template; default none.")
    auth: Auth | None = Field(default=None, description="basic or bearer auth; default none.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings; default verify.")
    follow_redirects: bool = Field(default=False, description="Follow 3xx; default false.")
    extract: dict[str, ExtractRule] = Field(
        default_factory=dict, description="Values to keep for later steps; default none."
    )

    @model_validator(mode="after")
    def _one_body(self) -> RequestConfig:
        if self.json_ is not None and self.body is not None:
            raise ValueError("give json or body, not both")
        return self


@dataclass(slots=True)
class Response:
    status: int
    headers: Mapping[str, str]  # aiohttp's: case-insensitive, as HTTP header names are
    body: bytes
    latency_s: float
    phases: dict[str, float]
    tls_not_after: float | None = None  # the leaf certificate's expiry, over TLS


class HttpExpect(Expect):
    """What an HTTP response must look like, its server's certificate included."""

    tls_valid_for: Duration | None = Field(
        default=None,
        description="Fail unless the server's certificate is valid this much longer, e.g. 14d; "
        "default: no check.",
    )


def translate(exc: BaseException, url: str, phases: dict[str, float]) -> StepFailed:
    """aiohttp's exceptions mapped to the reason vocabulary, in this one place."""
    drop_frames(exc)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientConnectorSSLError):
        return TlsError(f"TLS to {url}: {exc}", phases=phases)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return DnsError(f"cannot resolve {url}: {exc}", phases=phases)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectError(f"cannot connect to {url}: {exc.os_error}", phases=phases)
    if isinstance(exc, ssl.SSLError):
        return TlsError(f"TLS to {url}: {exc}", phases=phases)
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return Timeout(f"no answer from {url} in time", phases=phases)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return ConnectError(f"connection to {url} failed: {exc}", phases=phases)
    if isinstance(exc, aiohttp.ClientPayloadError):  # the target cut the body short
        return ConnectError(f"connection to {url} broke mid-response: {exc}", phases=phases)
    return OtherFailure(f"request to {url} failed: {type(exc).__name__}: {exc}", phases=phases)


USER_AGENT: Final = "hopwatch"


def _headers(config: RequestConfig, ctx: StepContext) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT}  # first, so a variant or the step may set another
    headers.update(ctx.outgoing_headers())
    headers.update(ctx.variant.get("headers") or {})
    for name, template in config.headers.items():
        headers[name] = ctx.render(template, "header")
    if config.auth is not None:
        if config.auth.bearer is not None:
            headers["Authorization"] = "Bearer " + ctx.render(config.auth.bearer, "header")
        elif config.auth.basic is not None:
            user = ctx.render(config.auth.basic.username)
            password = ctx.render(config.auth.basic.password)
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
    return headers


async def send(config: RequestConfig, ctx: StepContext) -> Response:
    """Send the configured request; time phases; read the whole body. Through the wire client
    (probes/http_wire.py) when it takes the request, else through the run's aiohttp session:
    redirects, HEAD, per-run cookies and the URLs the wire client leaves alone."""
    url = ctx.render(config.url, "url")
    headers = _headers(config, ctx)
    params = {k: ctx.render(v) for k, v in config.query.items()} or None
    data: bytes | None = None
    if config.json_ is not None:
        data = json.dumps(ctx.render_value(config.json_)).encode()
        headers.setdefault("Content-Type", "application/json")
    elif config.body is not None:
        data = ctx.render(config.body).encode()
    timer = PhaseTimer(start=time.monotonic())
    token = _current_timer.set(timer)  # where the socket factory and the TLS context find it
    try:
        if config.method != "HEAD" and not config.follow_redirects:
            wire = ctx.http.wire_for(ctx, config.tls)
            if wire is not None:
                answer = await wire.send(timer, config.method, url, headers, params, data)
                if answer is not None:
                    return answer
        session = ctx.http.session_for(ctx, config.tls)
        async with session.request(
            config.method,
            url,
            headers=headers,
            params=params,
            data=data,
            allow_redirects=config.follow_redirects,
        ) as resp:
            proto = timer.proto if timer.proto is not None and timer.proto.data_at else None
            timer.response_start = proto.data_at if proto is not None else time.monotonic()
            body = await resp.read()
            timer.end = proto.data_at if proto is not None else time.monotonic()
            return Response(
                status=resp.status,
                headers=resp.headers,
                body=body,
                latency_s=timer.latency,
                phases=timer.phases(),
                tls_not_after=not_after(timer.ssl_object),
            )
    except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
        raise translate(exc, url, timer.phases()) from exc
    finally:
        _current_timer.reset(token)
