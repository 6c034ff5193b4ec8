"""The `dns` kind: ask a name server one question over UDP or TCP and check its answer.

Like blackbox_exporter's dns prober: the record type, the server, the wanted response codes,
and the answers (exactly these, or each matching a regex), with dnspython doing the wire work.

A `server` given as a name (`ns1.example.com:53`) is resolved by the system's resolver at each
run, as `dig @ns1.example.com` and blackbox_exporter do, and its first IPv4 address asked (else
its first IPv6 one); a name that does not resolve fails the step `dns_error`. The question's
latency does not include that resolution.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from typing import Any, Final, Literal

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
from pydantic import BaseModel, ConfigDict, Field, field_validator

from probes.base import StepConfigBase, StepContext, StepOutcome
from probes.checks import check_latency
from probes.durations import Duration
from probes.errors import (
    AssertionFailed,
    ConnectError,
    DnsError,
    OtherFailure,
    StepFailed,
    Timeout,
    drop_frames,
    os_reason,
)
from probes.kinds import KindSpec, SpanShape, render_quietly

DNS_PORT: Final = 53


def split_server(value: str) -> tuple[str, int]:
    """HOST or HOST:PORT ([v6] or [v6]:PORT) as address and port; ValueError when malformed."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") or str(DNS_PORT)
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:  # a bare name, IPv4 or IPv6 address
        host, port = value, str(DNS_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"want HOST or HOST:PORT, got {value!r}")
    return host, int(port)


def _rcode(value: str) -> str:
    try:
        dns.rcode.from_text(value)
    except dns.rcode.UnknownRcode:
        raise ValueError(f"unknown rcode {value!r}") from None
    return value.upper()


class DnsExpect(BaseModel):
    """What the answer must look like."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rcode: list[str] = Field(
        default_factory=lambda: ["NOERROR"],
        description="Response codes that pass, e.g. [NOERROR, NXDOMAIN]; default [NOERROR].",
    )
    answers: list[str] | None = Field(
        default=None,
        description="The answer's records of the asked type, exactly (any order), as text: "
        '192.0.2.1, "v=spf1 -all", 10 mx.example.com.; default: any.',
    )
    answers_match: str | None = Field(
        default=None,
        description="Regex every answer record (`name ttl class type data`) must match; "
        "default: none.",
    )
    min_answers: int = Field(default=0, ge=0, description="At least this many; default 0.")
    max_latency: Duration | None = Field(
        default=None, description="Latency budget, e.g. 100ms; default: none."
    )

    @field_validator("rcode", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("rcode")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return [_rcode(v) for v in value]

    @field_validator("answers_match")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"bad regular expression {value!r}: {exc}") from exc
        return value


class Config(StepConfigBase):
    """One DNS question to one server."""

    kind: Literal["dns"] = Field(description="Step kind.")
    query_name: str = Field(description="The name to ask about (a template).")
    query_type: str = Field(default="A", description="Record type: A, AAAA, MX, TXT…; default A.")
    server: str | None = Field(
        default=None,
        description="HOST or HOST:PORT of the name server, HOST an address or a name (resolved "
        "by the system at each run); default: the system's first one.",
    )
    transport: Literal["udp", "tcp"] = Field(default="udp", description="udp or tcp; default udp.")
    recursion: bool = Field(default=True, description="Ask for recursion (RD); default true.")
    expect: DnsExpect = Field(default_factory=DnsExpect, description="Assertions; default NOERROR.")

    @field_validator("query_type")
    @classmethod
    def _type(cls, value: str) -> str:
        try:
            dns.rdatatype.from_text(value)
        except dns.rdatatype.UnknownRdatatype:
            raise ValueError(f"unknown record type {value!r}") from None
        return value.upper()

    @field_validator("server")
    @classmethod
    def _server(cls, value: str | None) -> str | None:
        if value is not None and "{{" not in value:
            split_server(value)
        return value


def system_server() -> tuple[str, int]:
    """The first name server the system's resolver is configured with."""
    try:
        servers = dns.resolver.get_default_resolver().nameservers
    except dns.resolver.NoResolverConfiguration:
        servers = []
    if not servers:
        raise OtherFailure("no server given and the system has no name server configured")
    return str(servers[0]), DNS_PORT


class DnsProbe:
    async def run(self, config: Config, ctx: StepContext) -> StepOutcome:
        if config.server:
            try:
                host, port = split_server(ctx.render(config.server))
            except ValueError as exc:
                raise OtherFailure(f"server: {exc}") from None
        else:
            host, port = system_server()
        address = await resolve_server(host, port)
        name = dns.name.from_text(ctx.render(config.query_name))
        rdtype = dns.rdatatype.from_text(config.query_type)
        query = dns.message.make_query(name, rdtype)
        if not config.recursion:
            query.flags &= ~dns.flags.RD
        where = f"{host}{'' if address == host else f' ({address})'}:{port}/{config.transport}"
        budget = ctx.remaining() if config.timeout is None else min(ctx.remaining(), config.timeout)
        started = time.monotonic()
        try:
            if config.transport == "udp":
                response = await dns.asyncquery.udp(
                    query, address, port=port, timeout=budget, raise_on_truncation=True
                )
            else:
                response = await dns.asyncquery.tcp(query, address, port=port, timeout=budget)
        except (dns.exception.DNSException, OSError, EOFError) as exc:
            raise _translate(exc, where) from exc
        latency = time.monotonic() - started
        rcode = dns.rcode.to_text(response.rcode())
        records = answer_records(response, rdtype)
        attributes = {"dns.response.code": rcode, "dns.answers": len(records)}
        try:
            check_answer(config.expect, rcode, records, latency)
        except StepFailed as failed:
            failed.attributes.update(attributes)
            failed.latency_s = latency
            raise
        values = {"answers": [data for _, data in records], "rcode": rcode}
        return StepOutcome(latency_s=latency, vars=values, attributes=attributes)


async def resolve_server(host: str, port: int) -> str:
    """The address to ask: `host` itself when it is one, else the first IPv4 address the
    system resolves it to (the first IPv6 one when it has none); DnsError when it has none."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise DnsError(f"cannot resolve the server {host}: {exc.strerror}") from None
    addresses = [str(info[4][0]) for info in infos]
    ipv4 = [a for a in addresses if ":" not in a]
    if not addresses:
        raise DnsError(f"cannot resolve the server {host}: no address")
    return (ipv4 or addresses)[0]


def answer_records(response: dns.message.Message, rdtype: Any) -> list[tuple[str, str]]:
    """(the record as a zone file line, its data) for each answer record of the asked type
    (a CNAME on the way is not an answer to an A question)."""
    out: list[tuple[str, str]] = []
    for rrset in response.answer:
        if rrset.rdtype == rdtype:
            lines = rrset.to_text().splitlines()
            out += [(line, rdata.to_text()) for line, rdata in zip(lines, rrset, strict=True)]
    return out


def check_answer(
    expect: DnsExpect, rcode: str, records: list[tuple[str, str]], latency: float
) -> None:
    """Raise the first assertion that does not hold."""
    if rcode not in expect.rcode:
        raise AssertionFailed(f"rcode {rcode}, want {' or '.join(expect.rcode)}")
    if len(records) < expect.min_answers:
        raise AssertionFailed(f"{len(records)} answers, want at least {expect.min_answers}")
    if expect.answers is not None:
        got = sorted(data for _, data in records)
        if got != sorted(expect.answers):
            raise AssertionFailed(f"answers {got}, want {sorted(expect.answers)}")
    if expect.answers_match is not None:
        pattern = re.compile(expect.answers_match)
        for line, _ in records:
            if pattern.search(line) is None:
                raise AssertionFailed(f"answer {line!r} does not match /{expect.answers_match}/")
    check_latency(expect.max_latency, latency)


def _translate(exc: BaseException, where: str) -> StepFailed:
    """dnspython's and the socket's errors as failures, in this one place."""
    drop_frames(exc)
    if isinstance(exc, dns.exception.Timeout):
        return Timeout(f"no answer from {where} in time")
    if isinstance(exc, dns.message.Truncated):
        return AssertionFailed(f"the answer from {where} is truncated: ask over tcp")
    if isinstance(exc, OSError | EOFError):
        return ConnectError(f"{where}: {os_reason(exc) if isinstance(exc, OSError) else exc}")
    return OtherFailure(f"{where}: {type(exc).__name__}: {exc}")


def dns_span(config: Config, ctx: StepContext) -> SpanShape:
    """A CLIENT span `DNS {type} {name}` with the question and the server."""
    name = render_quietly(ctx, config.query_name)
    attrs: dict[str, Any] = {
        "dns.question.name": name,
        "dns.question.type": config.query_type,
        "network.transport": config.transport,
    }
    if config.server is not None:
        try:
            host, port = split_server(render_quietly(ctx, config.server))
            attrs |= {"server.address": host, "server.port": port}
        except ValueError:
            pass
    return SpanShape(f"DNS {config.query_type} {name}", "client", attrs)


SPEC = KindSpec(
    Config,
    DnsProbe(),
    failures=(Timeout, DnsError, ConnectError, AssertionFailed, OtherFailure),
    span=dns_span,
)
