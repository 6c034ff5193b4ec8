"""The `grpc` kind: the standard health check, or one unary call with a JSON request whose
types the server describes through reflection, checked by JSON paths on the answer.

The channel per target is the engine's (`GrpcChannels`, lent through `ctx.shared`); the call
carries the synthetic-traffic marker and the trace context as metadata.

Over TLS the server's leaf certificate expiry is read by a handshake of our own
(`probes.tls_peek`: grpcio does not expose the peer certificate), after the call and outside
its latency, at most once per target every 5 minutes. A failed handshake fails the step (with
the handshake's reason, `tls_error`/`connect_error`/`timeout`, "certificate check: …") only
when the step asserts `tls_valid_for`, which it could not check otherwise; without that
assertion the call is the step's verdict and the run just has no expiry to export.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, Final, Literal

import grpc
import grpc.aio
from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from probes.base import StepConfigBase, StepContext, StepOutcome
from probes.checks import JSON_PATH_KEYS, ExtractRule, check_json_paths, check_latency, extract
from probes.durations import Duration
from probes.errors import (
    AssertionFailed,
    ConnectError,
    ExtractFailed,
    OtherFailure,
    StepFailed,
    Timeout,
    TlsError,
    drop_frames,
)
from probes.grpc_channels import GrpcChannels, Method, MethodNotFound
from probes.http_common import TlsConfig
from probes.kinds import KindSpec, SpanShape, render_quietly
from probes.tcp import split_address
from probes.tls_cert import check_valid_for

KIND: Final = "grpc"
HEALTH: Final = Method(
    "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
)
_TLS_WORDS: Final = ("ssl", "tls", "handshake", "certificate")
_METHOD: Final = re.compile(r"[A-Za-z_][\w.]*/[A-Za-z_]\w*")
_CODES: Final = {code.name: code for code in grpc.StatusCode}
PEEK_TIMEOUT: Final = 10.0  # seconds the certificate handshake may take (the step's own bounds it)
_MARGIN: Final = 0.05  # of the step's time left to the step after a certificate check timed out


class GrpcExpect(BaseModel):
    """What the answer must look like."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    status: str = Field(default="OK", description="gRPC status code name; default OK.")
    json_: Annotated[dict[str, Any], JSON_PATH_KEYS] = Field(
        default_factory=dict,
        alias="json",
        description="JSON path → wanted value in the answer (as proto3 JSON, field names as in "
        "the .proto); default: none.",
    )
    max_latency: Duration | None = Field(
        default=None, description="Latency budget, e.g. 200ms; default: none."
    )
    tls_valid_for: Duration | None = Field(
        default=None,
        description="Fail unless the server's certificate is valid this much longer, e.g. 14d "
        "(read by a handshake of hopwatch's own, at most every 5 minutes); default: no check.",
    )

    @field_validator("status")
    @classmethod
    def _known(cls, value: str) -> str:
        if value.upper() not in _CODES:
            raise ValueError(f"unknown gRPC status {value!r}")
        return value.upper()


class Config(StepConfigBase):
    """A gRPC health check (no `method`) or one unary call."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    kind: Literal["grpc"] = Field(description="Step kind.")
    target: str = Field(description="HOST:PORT of the server (a template).")
    tls: TlsConfig | None = Field(default=None, description="TLS settings; default: plaintext.")
    server_name: str | None = Field(
        default=None, description="TLS server name to verify; default: the host."
    )
    service: str = Field(
        default="", description="The health check's service name; default '' (the server)."
    )
    method: str | None = Field(
        default=None,
        description="package.Service/Method to call, its types found by server reflection; "
        "default: the grpc.health.v1 health check.",
    )
    request: Any = Field(
        default=None, description="The request as JSON (a template); default: empty."
    )
    metadata: dict[str, str] = Field(
        default_factory=dict, description="Extra metadata (templates); default none."
    )
    expect: GrpcExpect = Field(default_factory=GrpcExpect, description="Assertions; default OK.")
    extract: dict[str, ExtractRule] = Field(
        default_factory=dict, description="Values of the answer for later steps (json only)."
    )

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        if "{{" not in value:
            split_address(value)
        return value

    @field_validator("method")
    @classmethod
    def _method(cls, value: str | None) -> str | None:
        if value is not None and _METHOD.fullmatch(value) is None:
            raise ValueError(f"want package.Service/Method, got {value!r}")
        return value

    @model_validator(mode="after")
    def _tls_for_expiry(self) -> Config:
        if self.expect.tls_valid_for is not None and self.tls is None:
            raise ValueError("expect.tls_valid_for needs tls")
        return self

    @field_validator("extract")
    @classmethod
    def _json_only(cls, value: dict[str, ExtractRule]) -> dict[str, ExtractRule]:
        for name, rule in value.items():
            if rule.json_ is None:
                raise ValueError(f"{name}: a gRPC answer has only json paths to extract")
        return value


class GrpcProbe:
    async def run(self, config: Config, ctx: StepContext) -> StepOutcome:
        channels = ctx.lent(KIND, GrpcChannels)
        target = ctx.render(config.target)
        try:
            split_address(target)
        except ValueError as exc:
            raise OtherFailure(f"target: {exc}") from None
        channel = channels.channel(target, config.tls, config.server_name)
        metadata = self._metadata(config, ctx)
        budget = ctx.remaining() if config.timeout is None else min(ctx.remaining(), config.timeout)
        started = time.monotonic()
        ends = started + budget  # the certificate check must leave the step time to report
        try:
            if config.method is None:
                method = HEALTH
                request = health_pb2.HealthCheckRequest(service=ctx.render(config.service))
            else:
                method = await channels.method(channel, config.method, metadata, budget)
                request = json_format.ParseDict(ctx.render_value(config.request or {}),
                                                method.request())  # fmt: skip
            started = time.monotonic()  # reflection is learnt once: not the call's latency
            call = channel.unary_unary(
                method.path,
                request_serializer=method.request.SerializeToString,
                response_deserializer=method.response.FromString,
            )
            response = await call(request, metadata=metadata, timeout=budget)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code, response = exc.code(), None
            failure = _translate(exc, target, config.expect.status)
            if failure is not None:
                if isinstance(failure, AssertionFailed):  # the server answered: it has a cert
                    failure.tls_not_after = await _expiry(
                        config, channels, target, ends, quiet=True
                    )
                raise failure from exc
        except MethodNotFound as exc:
            raise OtherFailure(f"{target}: {exc}") from None
        except json_format.ParseError as exc:
            raise OtherFailure(f"request does not fit {config.method}: {exc}") from None
        latency = time.monotonic() - started
        attributes = {"rpc.grpc.status_code": code.value[0]}
        body = _as_json(response)
        expiry: float | None = None
        try:
            try:
                _check(config, ctx, code, response, body, latency)
                values = extract(config.extract, headers={}, body=body)
            except StepFailed as failed:
                failed.tls_not_after = await _expiry(config, channels, target, ends, quiet=True)
                raise
            expiry = await _expiry(config, channels, target, ends, quiet=False)
            check_valid_for(expiry, config.expect.tls_valid_for)
        except StepFailed as failed:
            failed.attributes.update(attributes)
            failed.latency_s = latency
            failed.tls_not_after = failed.tls_not_after or expiry
            raise
        return StepOutcome(
            latency_s=latency, vars=values, attributes=attributes, tls_not_after=expiry
        )

    @staticmethod
    def _metadata(config: Config, ctx: StepContext) -> list[tuple[str, str]]:
        """The marker and trace context, then the step's own (gRPC keys are lower case)."""
        pairs = {k.lower(): v for k, v in ctx.outgoing_headers().items()}
        for name, template in config.metadata.items():
            pairs[name.lower()] = ctx.render(template, "header")
        return list(pairs.items())


async def _expiry(
    config: Config, channels: GrpcChannels, target: str, ends: float, *, quiet: bool
) -> float | None:
    """The server's leaf certificate's notAfter, over TLS (see the module's docstring for when
    it is looked at). A failed look fails the step only when it asserts `tls_valid_for` and is
    not `quiet` (already failing for another reason)."""
    if config.tls is None:
        return None
    host, port = split_address(target)
    left = ends - time.monotonic() - _MARGIN
    try:
        return await channels.expiries.not_after(
            host, port, config.tls, config.server_name or host, min(PEEK_TIMEOUT, left)
        )
    except StepFailed as failed:
        if quiet or config.expect.tls_valid_for is None:
            return None
        raise type(failed)(f"certificate check: {failed.message}") from None


def _as_json(response: Any) -> bytes:
    if response is None:
        return b"{}"
    doc = json_format.MessageToDict(response, preserving_proto_field_name=True)
    return json.dumps(doc).encode()


def _check(
    config: Config,
    ctx: StepContext,
    code: grpc.StatusCode,
    response: Any,
    body: bytes,
    latency: float,
) -> None:
    """Raise the first assertion that does not hold."""
    if code.name != config.expect.status:
        raise AssertionFailed(f"status {code.name}, want {config.expect.status}")
    if config.method is None and response is not None:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        if status != "SERVING":
            raise AssertionFailed(f"health {status}, want SERVING")
    check_json_paths(json.loads(body), ctx.render_value(config.expect.json_))
    check_latency(config.expect.max_latency, latency)


def _translate(exc: grpc.aio.AioRpcError, target: str, wanted: str) -> StepFailed | None:
    """A failed call as a failure, in this one place; None when its status is the one wanted."""
    drop_frames(exc)
    code = exc.code()
    if code.name == wanted:
        return None
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        if any(word in details.lower() for word in _TLS_WORDS):
            return TlsError(f"TLS to {target}: {details}")
        return ConnectError(f"{target} unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Timeout(f"no answer from {target} in time")
    said = f": {details}" if details else ""
    return AssertionFailed(f"status {code.name}, want {wanted}{said}")


def grpc_span(config: Config, ctx: StepContext) -> SpanShape:
    """A CLIENT span `{service}/{method}` with the RPC conventions' attributes."""
    full = config.method or HEALTH.path.lstrip("/")
    service, _, method = full.partition("/")
    attrs: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    try:
        host, port = split_address(render_quietly(ctx, config.target))
        attrs |= {"server.address": host, "server.port": port}
    except ValueError:
        pass
    return SpanShape(full, "client", attrs)


SPEC = KindSpec(
    Config,
    GrpcProbe(),
    failures=(Timeout, ConnectError, TlsError, AssertionFailed, ExtractFailed, OtherFailure),
    span=grpc_span,
    shared=GrpcChannels,
)
