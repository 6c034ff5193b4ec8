"""What the HTTP kinds share: request config, TLS contexts, phase timing hooks, error translation.

aiohttp's exceptions are translated to the reason vocabulary here and only here.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import ssl
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from probes.base import StepContext
from probes.checks import ExtractRule
from probes.errors import ConnectError, DnsError, OtherFailure, StepFailed, Timeout, TlsError

HTTP_REASONS = (
    "timeout", "dns_error", "connect_error", "tls_error", "http_status", "assertion", "extract",
    "error",
)  # fmt: skip

_current_timer: contextvars.ContextVar[PhaseTimer | None] = contextvars.ContextVar(
    "hopwatch_phase_timer", default=None
)


@dataclass(slots=True)
class PhaseTimer:
    """Monotonic marks of one request's phases, filled by aiohttp trace hooks."""

    start: float = 0.0
    dns_start: float | None = None
    dns_end: float | None = None
    conn_start: float | None = None
    tls_start: float | None = None
    conn_end: float | None = None
    headers_sent: float | None = None
    response_start: float | None = None
    end: float | None = None
    reused: bool = False
    extra: dict[str, float] = field(default_factory=dict)

    def phases(self) -> dict[str, float]:
        """dns · connect · tls · processing · transfer in seconds, for the phases that happened."""
        out: dict[str, float] = {}
        if self.dns_start is not None and self.dns_end is not None:
            out["dns"] = self.dns_end - self.dns_start
        if self.conn_start is not None and self.conn_end is not None:
            tcp_end = self.tls_start if self.tls_start is not None else self.conn_end
            dns = out.get("dns", 0.0)
            out["connect"] = max(0.0, tcp_end - self.conn_start - dns)
            if self.tls_start is not None:
                out["tls"] = self.conn_end - self.tls_start
        sent = self.headers_sent if self.headers_sent is not None else self.conn_end
        if sent is not None and self.response_start is not None:
            out["processing"] = max(0.0, self.response_start - sent)
        if self.response_start is not None and self.end is not None:
            out["transfer"] = self.end - self.response_start
        return out


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


def build_trace_config() -> aiohttp.TraceConfig:
    """aiohttp trace hooks that fill the PhaseTimer passed as `trace_request_ctx`; built once."""

    def hook(attr: str) -> Any:
        async def mark(_s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: Any) -> None:
            timer = ctx.trace_request_ctx
            if isinstance(timer, PhaseTimer):
                setattr(timer, attr, time.monotonic())

        return mark

    async def reused(_s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: Any) -> None:
        if isinstance(ctx.trace_request_ctx, PhaseTimer):
            ctx.trace_request_ctx.reused = True

    config = aiohttp.TraceConfig()
    config.on_dns_resolvehost_start.append(hook("dns_start"))
    config.on_dns_resolvehost_end.append(hook("dns_end"))
    config.on_connection_create_start.append(hook("conn_start"))
    config.on_connection_create_end.append(hook("conn_end"))
    config.on_connection_reuseconn.append(reused)
    config.on_request_headers_sent.append(hook("headers_sent"))
    config.on_request_end.append(hook("response_start"))
    return config


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
    headers: dict[str, str]
    body: bytes
    latency_s: float
    phases: dict[str, float]


def translate(exc: BaseException, url: str, phases: dict[str, float]) -> StepFailed:
    """aiohttp's exceptions mapped to the reason vocabulary, in this one place."""
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
    return OtherFailure(f"request to {url} failed: {type(exc).__name__}: {exc}", phases=phases)


def _headers(config: RequestConfig, ctx: StepContext) -> dict[str, str]:
    headers = ctx.outgoing_headers()
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
    """Send the configured request in the run's session; time phases; read the whole body."""
    url = ctx.render(config.url, "url")
    headers = _headers(config, ctx)
    params = {k: ctx.render(v) for k, v in config.query.items()} or None
    data: bytes | None = None
    if config.json_ is not None:
        data = json.dumps(ctx.render_value(config.json_)).encode()
        headers.setdefault("Content-Type", "application/json")
    elif config.body is not None:
        data = ctx.render(config.body).encode()
    session = ctx.http.session_for(ctx, config.tls)
    timer = PhaseTimer(start=time.monotonic())
    token = _current_timer.set(timer)
    try:
        async with session.request(
            config.method,
            url,
            headers=headers,
            params=params,
            data=data,
            allow_redirects=config.follow_redirects,
            trace_request_ctx=timer,
        ) as resp:
            body = await resp.read()
            timer.end = time.monotonic()
            return Response(
                status=resp.status,
                headers=dict(resp.headers),
                body=body,
                latency_s=timer.end - timer.start,
                phases=timer.phases(),
            )
    except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
        raise translate(exc, url, timer.phases()) from exc
    finally:
        _current_timer.reset(token)
