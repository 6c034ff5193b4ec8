"""The `tcp` kind: connect to HOST:PORT, optionally over TLS, and hold a scripted conversation.

Like blackbox_exporter's `query_response`: a list of `expect` (a regex some line must match;
lines are read until one does), `send` (text written as is) and `starttls` (upgrade the
connection). Named groups of `expect` regexes become values for later steps; within the
conversation a `send` reuses the groups of the last `expect` before it as `${1}` or `${name}`
(`${0}` the whole match; `$${…}` is a literal `${…}`), as blackbox's `send` does, checked when
the flow loads. A group's text is put in as it came, never read as a template, and one holding
a line break is refused (it would smuggle a second command).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from functools import lru_cache
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from probes.base import StepConfigBase, StepContext, StepOutcome, Untrusted
from probes.checks import check_latency
from probes.durations import Duration
from probes.errors import (
    AssertionFailed,
    ConnectError,
    DnsError,
    OtherFailure,
    StepFailed,
    Timeout,
    TlsError,
    drop_frames,
    os_reason,
)
from probes.http_common import TlsConfig, build_ssl_context
from probes.kinds import KindSpec, SpanShape, render_quietly
from probes.tls_cert import check_valid_for, not_after

MAX_LINE: Final = 64 * 1024  # bytes a line may have before the step fails
MAX_LINES: Final = 1000  # lines one `expect` reads before giving up
# ${1} / ${name}: a group of the last expect's match; $${1} a literal ${1}
_GROUP_REF: Final = re.compile(r"\$(\$?)\{(\w+)\}")


def split_address(value: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) as host and port; ValueError naming what is wrong."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"want HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


class Exchange(BaseModel):
    """One move of the conversation: exactly one of expect, send, starttls."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    expect: str | None = Field(
        default=None, description="Regex a line must match (lines are read until one does)."
    )
    send: str | None = Field(
        default=None,
        description="Text to send (a template), as is; `${1}`, `${name}` (`${0}`: the whole "
        "match) are groups of the last expect's match, `$${…}` a literal `${…}`.",
    )
    starttls: bool = Field(default=False, description="Upgrade the connection to TLS here.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Exchange:
        given = [self.expect is not None, self.send is not None, self.starttls]
        if sum(given) != 1:
            raise ValueError("give exactly one of expect, send, starttls")
        if self.expect is not None:
            try:
                re.compile(self.expect)
            except re.error as exc:
                raise ValueError(f"bad regular expression {self.expect!r}: {exc}") from exc
        return self


class TcpExpect(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tls_valid_for: Duration | None = Field(
        default=None,
        description="Fail unless the server's certificate is valid this much longer, e.g. 14d; "
        "default: no check.",
    )
    max_latency: Duration | None = Field(
        default=None, description="Latency budget, e.g. 200ms; default: none."
    )


class Config(StepConfigBase):
    """A TCP connection and an optional conversation on it."""

    kind: Literal["tcp"] = Field(description="Step kind.")
    address: str = Field(description="HOST:PORT to connect to (a template).")
    tls: TlsConfig | None = Field(
        default=None,
        description="TLS settings: TLS from the start, or from the `starttls` move when there "
        "is one; default: plain TCP.",
    )
    server_name: str | None = Field(
        default=None, description="TLS server name (SNI and verification); default: the host."
    )
    query_response: list[Exchange] = Field(
        default_factory=list, description="The conversation after connecting; default: none."
    )
    expect: TcpExpect = Field(default_factory=TcpExpect, description="Assertions; default none.")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if "{{" not in value:
            split_address(value)
        return value

    @model_validator(mode="after")
    def _tls_once(self) -> Config:
        starttls = sum(1 for move in self.query_response if move.starttls)
        if starttls > 1:
            raise ValueError("query_response: starttls at most once")
        if self.expect.tls_valid_for is not None and self.tls is None and not starttls:
            raise ValueError("expect.tls_valid_for needs tls or a starttls move")
        last: re.Pattern[str] | None = None
        for number, move in enumerate(self.query_response, start=1):
            if move.expect is not None:
                last = re.compile(move.expect)
            elif move.send is not None:
                _check_refs(move.send, last, number)
        return self


def group_refs(text: str) -> list[str]:
    """The groups a `send` refers to (`${1}`, `${name}`; not the escaped `$${…}`)."""
    return [m.group(2) for m in _GROUP_REF.finditer(text) if not m.group(1)]


def _check_refs(send: str, last: re.Pattern[str] | None, number: int) -> None:
    """A send's `${…}` must name groups the last expect before it has, outside templates."""
    refs = group_refs(send)
    if not refs:
        return
    where = f"query_response entry {number}: send uses"
    if last is None:
        raise ValueError(f"{where} ${{{refs[0]}}} but no expect comes before it")
    for ref in refs:
        if ref.isdigit() and int(ref) > last.groups:
            plural = "" if last.groups == 1 else "s"
            raise ValueError(f"{where} ${{{ref}}} but the expect before it, /{last.pattern}/, "
                             f"has {last.groups} group{plural}")  # fmt: skip
        if not ref.isdigit() and ref not in last.groupindex:
            raise ValueError(f"{where} ${{{ref}}} but the expect before it, /{last.pattern}/, "
                             f"has no group named {ref!r}")  # fmt: skip
    for segment in _GROUP_REF.split(send)[::3]:  # the text between references
        if segment.count("{{") != segment.count("}}") or segment.count("{%") != segment.count("%}"):
            raise ValueError(f"{where} a group inside a {{{{ … }}}} template")


@lru_cache(maxsize=64)
def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """One context per distinct TLS settings: loading CAs is costly."""
    return build_ssl_context(tls)


class TcpProbe:
    async def run(self, config: Config, ctx: StepContext) -> StepOutcome:
        host, port = split_address(ctx.render(config.address))
        server_name = ctx.render(config.server_name) if config.server_name else host
        where = f"{host}:{port}"
        phases: dict[str, float] = {}
        started = time.monotonic()
        writer: asyncio.StreamWriter | None = None
        try:
            addresses = await _resolve(host, port, phases)
            mark = time.monotonic()
            sock = await _connect(addresses, where)
            phases["connect"] = time.monotonic() - mark
            upgrades = any(move.starttls for move in config.query_response)
            tls = ssl_context(config.tls) if config.tls is not None and not upgrades else None
            hostname = server_name if tls is not None else None
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=tls, server_hostname=hostname, limit=MAX_LINE
            )
            if tls is not None:
                phases["tls"] = time.monotonic() - mark - phases["connect"]
            values = await _converse(config, ctx, reader, writer, server_name, phases)
            latency = time.monotonic() - started
            expiry = not_after(writer.get_extra_info("ssl_object"))
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ValueError) as exc:
            raise _translate(exc, where, phases) from exc
        finally:
            if writer is not None:
                writer.close()
        try:
            check_valid_for(expiry, config.expect.tls_valid_for)
            check_latency(config.expect.max_latency, latency)
        except StepFailed as failed:
            failed.tls_not_after, failed.latency_s, failed.phases = expiry, latency, phases
            raise
        return StepOutcome(latency_s=latency, vars=values, phases=phases, tls_not_after=expiry)


async def _resolve(host: str, port: int, phases: dict[str, float]) -> list[Any]:
    mark = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DnsError(f"cannot resolve {host}: {exc.strerror}") from exc
    phases["dns"] = time.monotonic() - mark
    return infos


async def _connect(infos: list[Any], where: str) -> socket.socket:
    """A connected socket to the first address that takes it (the last error otherwise)."""
    loop = asyncio.get_running_loop()
    error: OSError | None = None
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    reason = os_reason(error) if error is not None else "no address"
    raise ConnectError(f"cannot connect to {where}: {reason}")


async def _converse(
    config: Config,
    ctx: StepContext,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    server_name: str,
    phases: dict[str, float],
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    last: re.Match[str] | None = None
    for move in config.query_response:
        if move.send is not None:
            writer.write(send_text(move.send, ctx, last).encode())
            await writer.drain()
        elif move.expect is not None:
            match = last = await _expect(reader, move.expect)
            values |= {k: Untrusted(v) for k, v in match.groupdict().items() if v is not None}
        else:
            mark = time.monotonic()
            tls = ssl_context(config.tls or TlsConfig())
            await writer.start_tls(tls, server_hostname=server_name)
            phases["tls"] = time.monotonic() - mark
    return values


def send_text(template: str, ctx: StepContext, last: re.Match[str] | None) -> str:
    """The `send` to write: its template parts rendered, its `${…}` replaced by the groups of
    `last` verbatim (after rendering, so a server's text is never read as a template)."""
    parts: list[str] = []
    at = 0
    for ref in _GROUP_REF.finditer(template):
        if ref.start() > at:
            parts.append(ctx.render(template[at : ref.start()]))
        escaped, name = ref.group(1), ref.group(2)
        parts.append("${" + name + "}" if escaped else _group(last, name))
        at = ref.end()
    if at < len(template) or not parts:
        parts.append(ctx.render(template[at:]))
    return "".join(parts)


def _group(match: re.Match[str] | None, name: str) -> str:
    if match is None:  # the flow's check makes this unreachable
        raise OtherFailure(f"send uses ${{{name}}} before any expect")
    value = match.group(int(name) if name.isdigit() else name) or ""
    if "\r" in value or "\n" in value:
        raise AssertionFailed(f"group {name} of the answer holds a line break: not sent")
    return value


async def _expect(reader: asyncio.StreamReader, pattern: str) -> re.Match[str]:
    compiled = re.compile(pattern)
    last = ""
    for _ in range(MAX_LINES):
        raw = await reader.readline()
        if not raw:
            seen = f"; last line {last!r}" if last else ""
            raise AssertionFailed(f"connection closed before a line matched /{pattern}/{seen}")
        last = raw.decode("utf-8", "replace").rstrip("\r\n")
        match = compiled.search(last)
        if match is not None:
            return match
    raise AssertionFailed(f"no line of {MAX_LINES} matched /{pattern}/; last line {last!r}")


def _translate(exc: BaseException, where: str, phases: dict[str, float]) -> StepFailed:
    """The socket's and ssl's errors as failures, in this one place."""
    drop_frames(exc)
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return TlsError(f"TLS to {where}: {exc}", phases=phases)
    if isinstance(exc, asyncio.IncompleteReadError | ConnectionError):
        return ConnectError(f"connection to {where} lost: {exc}", phases=phases)
    if isinstance(exc, ValueError):  # a line over the reader's limit
        return AssertionFailed(f"a line from {where} is longer than {MAX_LINE} bytes")
    if isinstance(exc, OSError):
        return ConnectError(f"cannot connect to {where}: {os_reason(exc)}", phases=phases)
    return OtherFailure(f"{where}: {type(exc).__name__}: {exc}", phases=phases)


def tcp_span(config: Config, ctx: StepContext) -> SpanShape:
    """A CLIENT span `connect HOST:PORT` with the network attributes."""
    attrs: dict[str, Any] = {"network.transport": "tcp"}
    try:
        host, port = split_address(render_quietly(ctx, config.address))
    except ValueError:
        return SpanShape("connect", "client", attrs)
    attrs |= {"server.address": host, "server.port": port}
    return SpanShape(f"connect {host}:{port}", "client", attrs)


SPEC = KindSpec(
    Config,
    TcpProbe(),
    failures=(Timeout, DnsError, ConnectError, TlsError, AssertionFailed, OtherFailure),
    span=tcp_span,
)
