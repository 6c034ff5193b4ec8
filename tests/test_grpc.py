"""The grpc kind against a real gRPC server on loopback: health, reflection, a unary call."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client import CollectorRegistry

from monitor.config import Config
from monitor.engine import Engine
from probes.tls_peek import PEEK_TTL
from tests.fixtures.core import free_port
from tests.fixtures.grpc_server import GrpcServer, start_grpc
from tests.fixtures.otlp import OtlpReceiver
from tests.fixtures.tls import ShortCert
from tests.test_http import run_flow


def flow(steps: str) -> str:
    return "flows:\n  - name: f\n    timeout: 5s\n    variants: {stable: {}}\n    steps:\n" + steps


async def test_health_check_of_the_server_and_of_a_service(
    grpc_server: GrpcServer, load_flows: Callable[[str], Config]
) -> None:
    steps = f"""\
      - {{name: server, kind: grpc, target: "{grpc_server.target}"}}
      - {{name: orders, kind: grpc, target: "{grpc_server.target}", service: shop.Orders}}
"""
    result = await run_flow(load_flows(flow(steps)))
    assert [(s.status, s.message) for s in result.steps] == [("passed", None)] * 2
    assert result.steps[0].attributes == {"rpc.grpc.status_code": 0}


@pytest.mark.parametrize(
    ("service", "reason", "message"),
    [
        ("shop.Broken", "assertion", "health NOT_SERVING, want SERVING"),
        ("shop.Nope", "assertion", "status NOT_FOUND, want OK"),
    ],
)
async def test_unhealthy_or_unknown_services_fail(
    grpc_server: GrpcServer,
    load_flows: Callable[[str], Config],
    service: str,
    reason: str,
    message: str,
) -> None:
    step = f'      - {{name: s, kind: grpc, target: "{grpc_server.target}", service: {service}}}\n'
    [s] = (await run_flow(load_flows(flow(step)))).steps
    assert (s.reason, s.message) == (reason, message)


async def test_unary_call_through_reflection_checked_extracted_and_marked(
    grpc_server: GrpcServer, load_flows: Callable[[str], Config]
) -> None:
    steps = f"""\
      - name: get
        kind: grpc
        target: "{grpc_server.target}"
        method: shop.Orders/GetOrder
        request: {{id: "o-{{{{ run.id }}}}"}}
        metadata: {{x-tenant: acme}}
        expect:
          json: {{$.status: paid, $.items: 3, $.id: "o-{{{{ run.id }}}}"}}
        extract: {{ref: {{json: $.ref}}}}
      - name: again
        kind: grpc
        target: "{grpc_server.target}"
        method: shop.Orders/GetOrder
        request: {{id: "{{{{ steps.get.ref }}}}"}}
        expect: {{json: {{$.ref: "ref-ref-o-{{{{ run.id }}}}"}}}}
"""
    result = await run_flow(load_flows(flow(steps)))
    assert [(s.status, s.message) for s in result.steps] == [("passed", None)] * 2
    first = grpc_server.metadata[0]
    assert first["x-hopwatch-run"] == result.run_id
    assert first["x-tenant"] == "acme"


@pytest.mark.parametrize(
    ("step", "reason", "message"),
    [
        ("method: shop.Orders/GetOrder\n        request: {id: missing}", "assertion",
         "status NOT_FOUND, want OK: no order missing"),
        ("method: shop.Orders/GetOrder\n        request: {id: missing}\n"
         "        expect: {status: NOT_FOUND}", None, None),
        ("method: shop.Orders/Cancel", "error",
         "{target}: shop.Orders has no method Cancel"),
        ("method: shop.Payments/Pay", "error",
         "{target}: reflection: not found"),
        ("method: shop.Orders/GetOrder\n        request: {nope: 1}", "error",
         'request does not fit shop.Orders/GetOrder: Message type "shop.GetOrderRequest" '
         'has no field named "nope" at "GetOrderRequest".\n Available Fields(except '
         'extensions): "[\'id\']"'),
        ("method: shop.Orders/GetOrder\n        request: {id: a}\n"
         "        expect: {json: {$.status: refunded}}", "assertion",
         "$.status is 'paid', want 'refunded'"),
    ],
)  # fmt: skip
async def test_unary_call_failures_say_why(
    grpc_server: GrpcServer,
    load_flows: Callable[[str], Config],
    step: str,
    reason: str | None,
    message: str | None,
) -> None:
    config = f'      - name: s\n        kind: grpc\n        target: "{grpc_server.target}"\n'
    [s] = (await run_flow(load_flows(flow(config + f"        {step}\n")))).steps
    want = message.format(target=grpc_server.target) if message else None
    assert (s.reason, s.message) == (reason, want)


async def test_nothing_listening_is_a_connect_error(load_flows: Callable[[str], Config]) -> None:
    step = f'      - {{name: s, kind: grpc, target: "127.0.0.1:{free_port()}", timeout: 2s}}\n'
    [s] = (await run_flow(load_flows(flow(step)))).steps
    assert s.reason == "connect_error"


async def test_tls_with_the_servers_ca_and_without_it(
    grpc_tls_server: Callable[[], Any], short_cert: ShortCert, load_flows: Callable[[str], Config]
) -> None:
    server, state = await grpc_tls_server()
    try:
        trusted = (
            f'      - {{name: s, kind: grpc, target: "{state.target}",'
            f" tls: {{ca_file: '{short_cert.ca_file}'}}}}\n"
        )
        untrusted = f'      - {{name: s, kind: grpc, target: "{state.target}", tls: {{}}}}\n'
        good = await run_flow(load_flows(flow(trusted)))
        bad = await run_flow(load_flows(flow(untrusted)))
    finally:
        await server.stop(grace=None)
    assert (good.steps[0].status, good.steps[0].message) == ("passed", None)
    assert bad.steps[0].reason == "tls_error", bad.steps[0].message


async def test_span_follows_the_rpc_conventions_and_the_call_carries_its_context(
    otel_env: OtlpReceiver, grpc_server: GrpcServer, load_flows: Callable[[str], Config]
) -> None:
    step = f"""\
      - name: get
        kind: grpc
        target: "{grpc_server.target}"
        method: shop.Orders/GetOrder
        request: {{id: a}}
"""
    result = await run_flow(load_flows(flow(step)))
    assert result.steps[0].status == "passed", result.steps[0].message
    name = "shop.Orders/GetOrder"
    spans = await otel_env.wait_for(lambda got: any(s.name == name for s in got))
    [span] = [s for s in spans if s.name == name]
    assert span.kind == "CLIENT" and span.trace_id == result.trace_id
    assert (
        span.attributes
        | {
            "rpc.system": "grpc",
            "rpc.service": "shop.Orders",
            "rpc.method": "GetOrder",
            "server.address": "127.0.0.1",
            "server.port": grpc_server.port,
            "rpc.grpc.status_code": 0,
        }
        == span.attributes
    )
    [metadata] = grpc_server.metadata
    assert metadata["traceparent"].split("-")[1] == result.trace_id


EXPIRY = "hopwatch_tls_cert_expiry_timestamp_seconds"
LABELS = {"flow": "f", "step": "s", "variant": "stable", "location": "local"}


async def test_tls_expiry_is_exported_and_asserted_with_the_authority_override(
    grpc_tls_server: Callable[[], Any], short_cert: ShortCert, load_flows: Callable[[str], Config]
) -> None:
    server, state = await grpc_tls_server()

    def step(valid_for: str, extra: str = "") -> str:
        return (
            f'      - {{name: s, kind: grpc, target: "{state.target}", server_name: localhost,'
            f" tls: {{ca_file: '{short_cert.ca_file}'}}, expect: {{tls_valid_for: {valid_for}}}"
            f"{extra}}}\n"
        )

    registry = CollectorRegistry()
    try:
        good = await run_flow(load_flows(flow(step("2d"))), registry)
        short = await run_flow(load_flows(flow(step("14d"))))
        unhealthy = await run_flow(load_flows(flow(step("2d", ", service: shop.Broken"))))
    finally:
        await server.stop(grace=None)
    want = short_cert.not_after.timestamp()
    assert (good.steps[0].status, good.steps[0].message) == ("passed", None)
    assert good.steps[0].tls_not_after == want
    assert registry.get_sample_value(EXPIRY, LABELS) == want
    [s] = short.steps
    assert (s.reason, s.tls_not_after) == ("assertion", want)
    assert s.message is not None and s.message.startswith("certificate expires in 3.0d (")
    # Failing for another reason, the step still knows the certificate it was served.
    [s] = unhealthy.steps
    assert (s.reason, s.message, s.tls_not_after) == (
        "assertion", "health NOT_SERVING, want SERVING", want)  # fmt: skip


async def test_tls_expiry_with_a_client_certificate(
    short_cert: ShortCert, load_flows: Callable[[str], Config], tmp_path: Path
) -> None:
    client = short_cert.ca.issue_cert("hopwatch@example.test")
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    server, state = await start_grpc(short_cert, client_auth=True)
    tls = f"{{ca_file: '{short_cert.ca_file}', cert_file: '{cert_file}', key_file: '{key_file}'}}"
    step = f'      - {{name: s, kind: grpc, target: "{state.target}", tls: {tls},'
    try:
        result = await run_flow(load_flows(flow(step + " expect: {tls_valid_for: 1d}}\n")))
    finally:
        await server.stop(grace=None)
    [s] = result.steps
    assert (s.status, s.message) == ("passed", None)
    assert s.tls_not_after == short_cert.not_after.timestamp()


async def test_a_rotated_certificate_shows_after_the_ttl_and_a_failed_check_is_said(
    short_cert: ShortCert, load_flows: Callable[[str], Config]
) -> None:
    """The channel keeps its first connection (and certificate); the expiry comes from a
    handshake of hopwatch's own, so a rotation shows once the cached figure is older than the
    TTL. A certificate new clients cannot verify fails the step asserting `tls_valid_for` only:
    for the other, the call (on its old connection) decides."""
    server, state = await start_grpc(short_cert)
    ca = f"tls: {{ca_file: '{short_cert.ca_file}'}}"
    steps = (
        f'      - {{name: plain, kind: grpc, target: "{state.target}", {ca}}}\n'
        f'      - {{name: s, kind: grpc, target: "{state.target}", {ca},'
        " expect: {tls_valid_for: 1d}}\n"
    )
    engine = Engine(load_flows(flow(steps)), None, CollectorRegistry())
    await engine.start(schedule=False, admin=False)
    later = 0.0
    try:
        expiries = engine.runner.deps.shared["grpc"].expiries  # type: ignore[attr-defined]
        expiries.clock = lambda: time.monotonic() + later
        [first] = await engine.run_once(engine.select())
        sooner = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        sooner += datetime.timedelta(hours=12)
        renewed = short_cert.ca.issue_cert("127.0.0.1", not_after=sooner)
        state.rotate(renewed.private_key_pem.bytes(), renewed.cert_chain_pems[0].bytes())
        [cached] = await engine.run_once(engine.select())
        later = PEEK_TTL + 1
        [rotated] = await engine.run_once(engine.select())
        state.rotate(*_untrusted_cert())
        later = 2 * PEEK_TTL + 2
        [untrusted] = await engine.run_once(engine.select())
        handshakes = expiries.handshakes
    finally:
        await engine.stop()
        await server.stop(grace=None)
    want = short_cert.not_after.timestamp()
    assert [(s.status, s.tls_not_after) for s in first.steps] == [("passed", want)] * 2
    assert [(s.status, s.tls_not_after) for s in cached.steps] == [("passed", want)] * 2
    [plain, s] = rotated.steps
    assert (s.reason, s.tls_not_after) == ("assertion", sooner.timestamp())
    assert s.message is not None and s.message.startswith("certificate expires in 12.0h (")
    assert (plain.status, plain.tls_not_after) == ("passed", sooner.timestamp())
    [plain, s] = untrusted.steps
    assert s.reason == "tls_error" and s.tls_not_after is None
    assert s.message is not None
    assert s.message.startswith(f"certificate check: TLS to {state.target}: [SSL: CERTIFICATE_")
    assert (plain.status, plain.message, plain.tls_not_after) == ("passed", None, None)
    # One handshake per TTL, plus one per step while they fail (a failure is not cached).
    assert handshakes == 4


def _untrusted_cert() -> tuple[bytes, bytes]:
    cert = trustme.CA().issue_cert("127.0.0.1")
    return cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes()
