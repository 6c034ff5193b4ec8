"""One synthetic transaction is one trace across hopwatch, the shop API, the worker and the webhook
sender — decoded from the real OTLP/HTTP exporters' protobuf — and exemplars name real traces."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from monitor.demo.runner import SECRET_ENV
from monitor.demo.webhooks import DEMO_SECRET
from tests.fixtures.demo import running_demo, short_deadlines
from tests.fixtures.otlp import OtlpReceiver, ReceivedSpan

SERVICES = {"hopwatch", "shop-api", "shop-worker", "shop-webhooks"}


def by_id(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.span_id: s for s in spans}


def ancestors(span: ReceivedSpan, index: dict[str, ReceivedSpan]) -> list[ReceivedSpan]:
    chain = []
    while span.parent_span_id and span.parent_span_id in index:
        span = index[span.parent_span_id]
        chain.append(span)
    return chain


async def test_one_trace_spans_every_service_of_the_chain(
    otel_env: OtlpReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, DEMO_SECRET)
    async with running_demo(tmp_path, tweak=short_deadlines) as demo:
        result = await demo.run("checkout")
        assert result.outcome == "success", [(s.name, s.message) for s in result.steps]
        trace_id = result.trace_id
        assert trace_id is not None and re.fullmatch(r"[0-9a-f]{32}", trace_id)

        def complete(_: list[ReceivedSpan]) -> bool:
            return {s.service for s in otel_env.trace(trace_id)} >= SERVICES

        await otel_env.wait_for(complete, timeout=20)
        spans = otel_env.trace(trace_id)
        index = by_id(spans)
        [root] = [s for s in spans if s.service == "hopwatch" and s.parent_span_id is None]
        assert root.name == "run checkout"
        assert root.attributes["hopwatch.outcome"] == "success"

        # The shop's SERVER span for POST /orders is a child of hopwatch's create_order span.
        [create] = [s for s in spans if s.service == "hopwatch" and s.kind == "CLIENT"
                    and s.attributes.get("http.request.method") == "POST"]  # fmt: skip
        shop_post = [s for s in spans if s.service == "shop-api" and s.kind == "SERVER"
                     and s.parent_span_id == create.span_id]  # fmt: skip
        assert shop_post, [(s.service, s.name, s.kind) for s in spans]

        # The worker's consumer span descends from the shop's request (via Kafka headers).
        [process] = [s for s in spans if s.service == "shop-worker" and s.kind == "CONSUMER"
                     and s.name == "process orders"]  # fmt: skip
        assert shop_post[0] in ancestors(process, index)
        assert process.links, "the consumer span links to the producer's context"

        # The webhook sender's request descends from the worker; hopwatch's awaiting step is a
        # CONSUMER span linked to that delivery's context.
        [delivery] = [s for s in spans if s.service == "shop-webhooks" and s.kind == "CLIENT"]
        assert process in ancestors(delivery, index)
        [awaited] = [s for s in spans if s.service == "hopwatch" and s.kind == "CONSUMER"
                     and "fulfilment" in s.name]  # fmt: skip
        linked = {(t, s) for t, s, _ in awaited.links}
        assert any(t == trace_id for t, _ in linked)
        assert root in ancestors(awaited, index)

        # Exemplars in the OpenMetrics exposition name traces that were exported.
        async with aiohttp.ClientSession() as http:
            headers = {"Accept": "application/openmetrics-text"}
            async with http.get(f"{demo.admin_url}/metrics", headers=headers) as resp:
                text = await resp.text()
        exemplar_ids = set(re.findall(r'# \{trace_id="([0-9a-f]{32})"\}', text))
        assert trace_id in exemplar_ids
        assert exemplar_ids <= otel_env.trace_ids()
