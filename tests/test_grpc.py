"""The grpc kind against a real gRPC server on loopback: health, reflection, a unary call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from monitor.config import Config
from tests.fixtures.core import free_port
from tests.fixtures.grpc_server import GrpcServer
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
