"""Traces end to end: the real OTLP/HTTP exporter → a receiver on loopback, hopwatch's run and
step spans joined by the demo shop's SERVER spans, export decided at the run's end, exemplars."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import CollectorRegistry

from monitor.config import Config
from monitor.correlator import Arrival
from monitor.demo.shop import FAULTS_KEY, Faults, build_shop_app
from monitor.demo.telemetry import (
    Telemetry,
    extract_kafka_context,
    inject_headers,
    inject_kafka_headers,
)
from monitor.engine import Engine, Options
from monitor.output import as_json
from monitor.results import RunResult, StepResult
from monitor.templates import Templates
from monitor.tracing import (
    RunExportProcessor,
    SamplingPolicy,
    Tracing,
    build_exporters,
    build_resource,
    kafka_headers_as_text,
)
from probes.base import RunInfo, StepContext
from probes.errors import ConfigError
from probes.http_span import redact_url
from tests.fixtures.core import free_port, serve
from tests.fixtures.otlp import OtlpReceiver, ReceivedSpan

FLOWS = """\
flows:
  - name: checkout
    timeout: 5s
    variants: {{stable: {{base_url: 'http://probe:s3cret@127.0.0.1:{port}'}}}}
    steps:
      - name: create_order
        kind: http
        method: POST
        url: "{{{{ variant.base_url }}}}/orders"
        json: {{sku: probe-1, ref: "{{{{ run.correlation }}}}"}}
        expect: {{status: 201}}
        extract: {{order_id: {{json: "$.id"}}}}
      - name: read_back
        kind: http
        url: "{{{{ variant.base_url }}}}/orders/{{{{ steps.create_order.order_id }}}}"
    cleanup:
      - name: delete_order
        kind: http
        method: DELETE
        url: "{{{{ variant.base_url }}}}/orders/{{{{ steps.create_order.order_id }}}}"
"""
EXEMPLAR = re.compile(r'^(hopwatch_\w+)_bucket\{.*\} \S+ # \{trace_id="([0-9a-f]{32})"\}', re.M)


@dataclass
class Demo:
    """hopwatch (tracing on) watching the instrumented demo shop, both exporting to the receiver."""

    engine: Engine
    tracing: Tracing
    shop: TestServer
    shop_telemetry: Telemetry
    receiver: OtlpReceiver
    admin_url: str

    async def run(self, n: int = 1) -> list[RunResult]:
        return await self.engine.run_once(self.engine.select(), repeat=n)

    async def flush(self) -> None:
        """After this every span that has ended is in the receiver (force_flush waits for it)."""
        assert await self.tracing.flush()
        assert await self.shop_telemetry.flush()

    def faults(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.shop.app[FAULTS_KEY], key, value)

    def hopwatch_traces(self) -> set[str]:
        return {s.trace_id for s in self.receiver.spans if s.service == "hopwatch"}


@pytest.fixture
async def demo(
    otel_env: OtlpReceiver,
    load_flows: Callable[[str], Config],
    registry: CollectorRegistry,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Demo]:
    for name, value in getattr(request, "param", {}).items():
        monkeypatch.setenv(name, value)
    tracing = Tracing.from_env(location="test-loc")
    assert tracing is not None
    telemetry = Telemetry.from_env("shop-api")
    app = build_shop_app(Faults())
    telemetry.instrument(app)
    shop = await serve(app)
    admin = f"127.0.0.1:{free_port()}"
    engine = Engine(
        load_flows(FLOWS.format(port=shop.port)), Options(admin_listen=admin), registry=registry
    )
    engine.runner.deps.tracing = tracing  # what the engine does once it builds Tracing itself
    await engine.start(schedule=False, admin=True)
    try:
        yield Demo(engine, tracing, shop, telemetry, otel_env, f"http://{admin}")
    finally:
        await engine.stop()
        await shop.close()
        await tracing.aclose()
        await telemetry.aclose()


def by_name(spans: list[ReceivedSpan], service: str, name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.service == service and s.name == name]


async def test_one_trace_holds_the_run_its_steps_and_the_shops_server_spans(demo: Demo) -> None:
    [result] = await demo.run()
    assert result.outcome == "success", [s.message for s in result.steps]
    assert result.trace_id is not None and re.fullmatch(r"[0-9a-f]{32}", result.trace_id)
    assert (
        json.loads(as_json([result]))["runs"][0]["trace_id"] == result.trace_id
    )  # check --output json
    await demo.flush()
    spans = demo.receiver.trace(result.trace_id)

    [root] = [s for s in spans if s.parent_span_id is None]
    assert (root.service, root.name, root.kind) == ("hopwatch", "run checkout", "INTERNAL")
    assert root.resource["service.version"] and root.resource["hopwatch.location"] == "test-loc"
    want = {"hopwatch.flow": "checkout", "hopwatch.variant": "stable",
            "hopwatch.location": "local", "hopwatch.outcome": "success",
            "hopwatch.run_id": result.run_id}  # fmt: skip
    assert root.attributes | want == root.attributes
    assert root.status == "UNSET"

    steps = {
        s.attributes["hopwatch.step"]: s for s in spans if s.service == "hopwatch" and s != root
    }
    assert set(steps) == {"create_order", "read_back", "delete_order"}
    create = steps["create_order"]
    assert (create.kind, create.name, create.parent_span_id) == ("CLIENT", "POST", root.span_id)
    port = demo.shop.port
    assert create.attributes["url.full"] == f"http://REDACTED:REDACTED@127.0.0.1:{port}/orders"
    assert "s3cret" not in str([s.attributes for s in spans])
    assert create.attributes["http.request.method"] == "POST"
    assert create.attributes["server.address"] == "127.0.0.1"
    assert create.attributes["server.port"] == port
    assert create.attributes["http.response.status_code"] == 201
    assert steps["read_back"].name == "GET"
    assert steps["delete_order"].attributes["hopwatch.cleanup"] is True

    # Each hopwatch request shows up as the shop's SERVER span, a child of the step's span,
    # carrying the run's baggage.
    for step, name in [("create_order", "POST /orders"), ("read_back", "GET /orders/{id}"),
                       ("delete_order", "DELETE /orders/{id}")]:  # fmt: skip
        [server] = by_name(spans, "shop-api", name)
        assert server.kind == "SERVER"
        assert server.parent_span_id == steps[step].span_id
        assert server.attributes["hopwatch.run_id"] == result.run_id
        assert server.attributes["hopwatch.flow"] == "checkout"


@pytest.mark.parametrize("demo", [{"OTEL_TRACES_SAMPLER": "always_off"}], indirect=True)
async def test_failing_runs_are_always_exported_successful_ones_follow_the_ratio(
    demo: Demo,
) -> None:
    passed = await demo.run(3)
    demo.faults(status=503, paths=["/orders"])
    failed = await demo.run(2)
    demo.faults(status=None, paths=[])
    assert [r.outcome for r in passed + failed] == ["success"] * 3 + ["failure"] * 2
    assert all(r.trace_id is None for r in passed)  # dropped: no trace id to point at
    failed_ids = {r.trace_id for r in failed}
    assert None not in failed_ids
    await demo.flush()
    assert demo.hopwatch_traces() == failed_ids

    spans = demo.receiver.trace(failed[0].trace_id or "")
    [root] = [s for s in spans if s.parent_span_id is None]
    assert root.status == "ERROR"
    assert root.attributes["hopwatch.broken_step"] == "create_order"
    assert root.attributes["hopwatch.reason"] == "http_status"
    [step] = [s for s in spans if s.attributes.get("hopwatch.step") == "create_order"]
    assert (step.status, step.attributes["hopwatch.reason"]) == ("ERROR", "http_status")
    assert step.attributes["error.type"] == "503"
    assert ("hopwatch.step.failed", {"hopwatch.reason": "http_status",
            "hopwatch.message": "status 503, want 201"}) in step.events  # fmt: skip
    [server] = by_name(spans, "shop-api", "POST /orders")
    assert server.status == "ERROR" and server.parent_span_id == step.span_id


async def test_openmetrics_exemplars_name_exported_traces(demo: Demo) -> None:
    results = await demo.run(2)
    demo.faults(status=503, paths=["/orders"])
    results += await demo.run(1)
    await demo.flush()
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{demo.admin_url}/metrics", headers={"Accept": "application/openmetrics-text"}
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "application/openmetrics-text"
        text = await resp.text()
    exemplars = EXEMPLAR.findall(text)
    metrics = {m for m, _ in exemplars}
    assert {"hopwatch_step_duration_seconds", "hopwatch_run_duration_seconds"} <= metrics
    ids = {tid for _, tid in exemplars}
    assert ids <= demo.hopwatch_traces()
    assert ids <= {r.trace_id for r in results}
    assert (results[-1].trace_id or "") in ids  # the failing run's trace is a click away


def make_context(renderer: Templates) -> StepContext:
    return StepContext(
        run=RunInfo(id="r1", correlation="hw-r1", flow="orders", variant="stable", location="x"),
        variant={},
        steps={},
        renderer=renderer,
        http=None,  # type: ignore[arg-type]
        marker_header="X-Hopwatch-Run",
        public_url="http://127.0.0.1:8080",
        deadline=time.monotonic() + 5,
    )


def run_result(ctx: StepContext, trace_id: str | None, steps: list[StepResult]) -> RunResult:
    outcome = "failure" if any(s.status == "failed" for s in steps) else "success"
    return RunResult(ctx.run.id, ctx.run.flow, ctx.run.variant, ctx.run.location,
                     ctx.run.correlation, time.time(), 0.1, outcome, steps, trace_id)  # fmt: skip


@pytest.mark.parametrize(
    ("step", "meta", "want"),
    [
        (
            SimpleNamespace(kind="webhook_await", name="hook", path="/hooks/fulfilment"),
            {},
            {"url.path": "/hooks/fulfilment"},
        ),
        (
            SimpleNamespace(kind="kafka_consume", name="event", topic="orders"),
            {"topic": "orders", "partition": 2, "offset": 41},
            {"messaging.system": "kafka", "messaging.destination.name": "orders",
             "messaging.destination.partition.id": "2", "messaging.kafka.offset": 41,
             "messaging.kafka.message.key": "hw-r1"},
        ),
    ],
)  # fmt: skip
async def test_awaited_arrival_is_a_consumer_span_linked_to_its_sender(
    otel_env: OtlpReceiver, step: Any, meta: dict[str, Any], want: dict[str, Any]
) -> None:
    tracing = Tracing.from_env(location="x")
    sender = Telemetry.from_env("shop-webhooks")
    assert tracing is not None
    ctx = make_context(Templates())
    run = tracing.run_scope(ctx)
    trace_id = run.__enter__()
    headers = ctx.outgoing_headers()
    assert headers["X-Hopwatch-Run"] == "r1"
    assert headers["traceparent"].split("-")[1] == trace_id
    assert "hopwatch.run_id=r1" in headers["baggage"]

    # The demo sender continues the run's context; the delivery carries its CLIENT span's.
    received: list[Mapping[str, str]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(request.headers)
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/hooks/fulfilment", hook)
    hooks = await serve(app)
    async with aiohttp.ClientSession(trace_configs=[sender.client_trace_config()]) as session:
        url = f"http://127.0.0.1:{hooks.port}/hooks/fulfilment"
        async with session.post(url, json={"ref": "hw-r1"}) as resp:
            assert resp.status == 202
    await hooks.close()
    [delivery] = received
    result = StepResult(step.name, step.kind, "passed", time.time(), 0.0)
    scope = tracing.step_scope(ctx, step, result)
    scope.__enter__()
    ctx.step = step.name
    arrival = Arrival(step.kind.split("_")[0], "c", time.monotonic(), time.time(),
                      delivery, b"{}", {}, "d-1", key=b"hw-r1", meta=meta)  # fmt: skip
    ctx.note_arrival(arrival)
    scope.finish(result)
    run.finish(run_result(ctx, trace_id, [result]))
    assert await tracing.flush() and await sender.flush()
    await tracing.aclose()
    await sender.aclose()

    spans = otel_env.trace(trace_id or "")
    [consumer] = [s for s in spans if s.kind == "CONSUMER"]
    [root] = [s for s in spans if s.parent_span_id is None]
    assert consumer.parent_span_id == root.span_id
    [client] = by_name(spans, "shop-webhooks", "POST")
    assert client.kind == "CLIENT" and client.parent_span_id == root.span_id  # joined the run
    assert client.attributes["http.response.status_code"] == 202
    assert consumer.links == [(trace_id, client.span_id, {"hopwatch.link": "sender"})]
    assert consumer.attributes | want == consumer.attributes
    assert consumer.attributes["messaging.message.id"] == "d-1"


def test_kafka_headers_carry_context_and_the_worker_span_is_child_and_link() -> None:
    worker = Telemetry(TracerProvider(), enabled=False)
    producer = worker.tracer.start_span("send orders")
    with trace.use_span(producer, end_on_exit=True):
        headers = inject_kafka_headers([("X-Hopwatch-Run", b"r1")])
        plain = inject_headers({})
    names = [name for name, _ in headers]
    assert names[0] == "X-Hopwatch-Run" and "traceparent" in names
    assert all(isinstance(value, bytes) for _, value in headers)
    assert kafka_headers_as_text(headers)["traceparent"] == plain["traceparent"]
    sent = producer.get_span_context()
    got = trace.get_current_span(extract_kafka_context(headers)).get_span_context()
    assert (got.trace_id, got.span_id, got.is_remote) == (sent.trace_id, sent.span_id, True)
    with worker.consumer_span("orders", headers, partition=0, offset=7) as span:
        assert span.get_span_context().trace_id == sent.trace_id
        assert span.parent is not None and span.parent.span_id == sent.span_id  # type: ignore[attr-defined]
        assert [link.context.span_id for link in span.links] == [sent.span_id]  # type: ignore[attr-defined]


TRACE_ID = 0x0123456789ABCDEF_8000000000000001  # low 64 bits just above the 0.5 bound


@pytest.mark.parametrize(
    ("env", "policy"),
    [
        ({}, SamplingPolicy(1.0, parent_based=True)),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, SamplingPolicy(0.0, parent_based=False)),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
         SamplingPolicy(0.25, parent_based=False)),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
         SamplingPolicy(0.0, parent_based=True)),
    ],
)  # fmt: skip
def test_sampling_policy_from_env(env: dict[str, str], policy: SamplingPolicy) -> None:
    assert SamplingPolicy.from_env(env) == policy


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_SAMPLER": "xray"}, "OTEL_TRACES_SAMPLER=xray: want always_on"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
         "OTEL_TRACES_SAMPLER_ARG=2: want a number from 0 to 1"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
         "OTEL_TRACES_SAMPLER_ARG=half: want a number from 0 to 1"),
    ],
)  # fmt: skip
def test_sampling_policy_refuses_what_it_cannot_honour(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        SamplingPolicy.from_env(env)


def remote_parent(sampled: bool) -> SpanContext:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return SpanContext(TRACE_ID, 0x1, is_remote=True, trace_flags=flags)


@pytest.mark.parametrize(
    ("policy", "outcome", "parent", "keep"),
    [
        (SamplingPolicy(0.0), "failure", None, True),
        (SamplingPolicy(0.0), "aborted", None, True),
        (SamplingPolicy(0.0), "failure", remote_parent(False), True),
        (SamplingPolicy(1.0), "success", None, True),
        (SamplingPolicy(0.0), "success", None, False),
        (SamplingPolicy(0.5), "success", None, False),  # the SDK's ratio test, on the low 64 bits
        (SamplingPolicy(0.51), "success", None, True),
        (SamplingPolicy(1.0), "success", remote_parent(False), False),
        (SamplingPolicy(0.0), "success", remote_parent(True), True),
        (SamplingPolicy(0.0, parent_based=False), "success", remote_parent(True), False),
    ],
)
def test_keep_decision(
    policy: SamplingPolicy, outcome: str, parent: SpanContext | None, keep: bool
) -> None:
    assert policy.keep(TRACE_ID, outcome, parent) is keep
    if parent is None:  # agrees with the SDK's own sampler for successful runs
        sdk = TraceIdRatioBased(policy.ratio).should_sample(None, TRACE_ID, "x").decision
        assert sdk.is_sampled() is keep or outcome != "success"


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ["OTLPSpanExporter"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"},
         ["OTLPSpanExporter"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["ConsoleSpanExporter"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["OTLPSpanExporter", "ConsoleSpanExporter"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
    ],
)  # fmt: skip
def test_exporters_from_env(env: dict[str, str], want: list[str]) -> None:
    assert [type(e).__name__ for e in build_exporters(env)] == want


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER=jaeger: want otlp"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
         "OTEL_EXPORTER_OTLP_PROTOCOL=http/json: want http/protobuf or grpc"),
    ],
)  # fmt: skip
def test_exporters_refuse_what_they_cannot_honour(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_exporters(env)


def test_tracing_is_off_without_a_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_TRACES_SAMPLER"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert Tracing.from_env(location="x") is None


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("http://u:p@h:8/a?x=1", "http://REDACTED:REDACTED@h:8/a?x=1"),
        ("https://h/a?sig=abc&x=1", "https://h/a?sig=REDACTED&x=1"),
        ("https://h/a?token=TOPSECRET", "https://h/a?token=***"),
    ],
)
def test_url_full_is_redacted(url: str, want: str) -> None:
    templates = Templates()
    templates.redactor.add("TOPSECRET")
    assert redact_url(url, templates.redactor) == want


def test_processor_holds_runs_and_stays_bounded() -> None:
    exporter = InMemorySpanExporter()
    processor = RunExportProcessor([SimpleSpanProcessor(exporter)], max_runs=2, max_spans=2)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")

    def trace_of(n_spans: int) -> int:
        root = tracer.start_span("root", context=trace.set_span_in_context(NonRecordingSpan(
            SpanContext(0, 0, False))))  # fmt: skip
        trace_id = root.get_span_context().trace_id
        processor.begin(trace_id)
        with trace.use_span(root, end_on_exit=True):
            for _ in range(n_spans - 1):
                tracer.start_span("child").end()
        return trace_id

    dropped, kept = trace_of(2), trace_of(3)  # the second one goes over max_spans
    assert exporter.get_finished_spans() == ()  # held until decided
    processor.decide(dropped, keep=False)
    processor.decide(kept, keep=True)
    assert len(exporter.get_finished_spans()) == 2 and processor.dropped_spans == 1
    tracer.start_span("late", context=trace.set_span_in_context(NonRecordingSpan(SpanContext(
        dropped, 0x5, False)))).end()  # fmt: skip
    assert len(exporter.get_finished_spans()) == 2  # a late span follows its run's verdict
    for _ in range(3):
        trace_of(1)  # three undecided runs, room for two: the oldest is exported, not lost
    assert processor.evicted_runs == 1 and len(exporter.get_finished_spans()) == 3
    provider.shutdown()
    assert len(exporter.get_finished_spans()) == 5  # shutdown exports what is still held


def test_resource_names_hopwatch_unless_the_environment_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=prod")
    attrs = build_resource("hopwatch", {"hopwatch.location": "eu-west-1"}).attributes
    assert attrs["service.name"] == "hopwatch" and attrs["hopwatch.location"] == "eu-west-1"
    assert attrs["deployment.environment.name"] == "prod"
    assert attrs["telemetry.sdk.name"] == "opentelemetry"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "hopwatch-canary")
    assert build_resource("hopwatch", {}).attributes["service.name"] == "hopwatch-canary"


async def test_client_trace_config_spans_each_request_and_marks_failures(
    otel_env: OtlpReceiver,
) -> None:
    worker, shop_telemetry = Telemetry.from_env("shop-worker"), Telemetry.from_env("shop-api")
    app = build_shop_app(Faults())
    shop_telemetry.instrument(app)
    shop = await serve(app)
    closed = free_port()
    with worker.consumer_span("orders", [], partition=0, offset=1) as consumer:
        async with aiohttp.ClientSession(trace_configs=[worker.client_trace_config()]) as session:
            async with session.get(f"http://127.0.0.1:{shop.port}/orders/nope") as resp:
                assert resp.status == 404
            with pytest.raises(aiohttp.ClientConnectorError):
                await session.get(f"http://127.0.0.1:{closed}/")
    await shop.close()
    assert await worker.flush() and await shop_telemetry.flush()
    await worker.aclose()
    await shop_telemetry.aclose()

    spans = otel_env.trace(f"{consumer.get_span_context().trace_id:032x}")
    clients = by_name(spans, "shop-worker", "GET")
    [got] = [s for s in clients if "http.response.status_code" in s.attributes]
    [refused] = [s for s in clients if s != got]
    [server] = by_name(spans, "shop-api", "GET /orders/{id}")
    parent = f"{consumer.get_span_context().span_id:016x}"
    assert got.parent_span_id == refused.parent_span_id == parent
    assert server.parent_span_id == got.span_id
    assert (got.status, got.attributes["error.type"]) == ("ERROR", "404")  # a client's 4xx
    assert (server.status, server.attributes["http.response.status_code"]) == ("UNSET", 404)
    assert (refused.status, refused.attributes["error.type"]) == ("ERROR", "ClientConnectorError")
