"""The webhook receiver on a real 127.0.0.1 server and the webhook_await kind end to end."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from monitor.correlator import Correlator
from monitor.receivers.webhooks import WebhookRoute, install_webhook_routes, routes_from_steps
from probes.base import StepContext, StepOutcome
from probes.errors import (
    AssertionFailed,
    ConfigError,
    Duplicate,
    ExtractFailed,
    NotReceived,
    SignatureInvalid,
)
from probes.signatures import StandardWebhooksSignature
from probes.waiting import expectation_key
from probes.webhook_await import KIND, Config, WebhookAwaitProbe
from tests.fixtures.webhooks import (
    SW_SECRET,
    ContextFactory,
    ServerFactory,
    arrivals_count,
    standard_headers,
)

PATH = "/hooks/fulfilment"
SIGNED = {"scheme": "standard_webhooks", "secret": SW_SECRET}
PROBE = WebhookAwaitProbe()
Client = Any  # aiohttp.test_utils.TestClient


def step(**fields: Any) -> Config:
    raw = {"name": "fulfilment_webhook", "kind": "webhook_await", "path": PATH, "within": "2s"}
    raw.update(fields)
    return Config.model_validate(raw)


def signed_route(**kwargs: Any) -> WebhookRoute:
    return WebhookRoute(PATH, StandardWebhooksSignature.model_validate(SIGNED), **kwargs)


async def post(client: Client, doc: Any, msg_id: str, **headers: str) -> tuple[int, str]:
    body = json.dumps(doc).encode()
    sent = {**standard_headers(body, msg_id), **headers}
    async with client.post(PATH, data=body, headers=sent) as resp:
        return resp.status, await resp.text()


async def run_step(
    config: Config,
    ctx: StepContext,
    trigger: Callable[[], Awaitable[Any]] | None = None,
    *,
    before_run: Callable[[], Awaitable[Any]] | None = None,
) -> StepOutcome:
    """Do what the runner does: register at run start, run the trigger step, then this step."""
    ctx.step = config.name
    PROBE.expect(config, ctx)
    ctx.step = "create_order"
    ctx.step_started["create_order"] = time.monotonic()
    if trigger is not None:
        await trigger()
    ctx.step = config.name
    ctx.step_started[config.name] = time.monotonic()
    if before_run is not None:
        await before_run()
    return await PROBE.run(config, ctx)


def order_ctx(run_context: ContextFactory, run_id: str = "run1", order: int = 42) -> StepContext:
    return run_context(run_id, create_order={"order_id": order})


# -- answers and their counts ---------------------------------------------------------------


@pytest.fixture
async def signed_server(webhook_server: ServerFactory) -> AsyncIterator[Client]:
    yield await webhook_server([signed_route()], max_body=1024)


async def test_accepted_delivery_gets_the_default_answer(
    signed_server: Client, registry: CollectorRegistry
) -> None:
    assert await post(signed_server, {"order_id": 1}, "msg_1") == (202, "")
    assert arrivals_count(registry, "unmatched") == 1  # nobody expected it, still a 2xx


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "Application/JSON", "application/cloudevents+json"],
)
async def test_json_content_types_beyond_the_usual_one_are_accepted(
    signed_server: Client, registry: CollectorRegistry, content_type: str
) -> None:
    assert await post(
        signed_server, {"order_id": 1}, "msg_1", **{"Content-Type": content_type}
    ) == (202, "")
    assert arrivals_count(registry, "malformed") == 0


@pytest.mark.parametrize(
    ("headers", "body", "status", "outcome", "text"),
    [
        ({"webhook-signature": ""}, b'{"a":1}', 401, "bad_signature",
         "missing header webhook-signature"),
        ({"webhook-signature": "v1,Zm9vYmFy"}, b'{"a":1}', 401, "bad_signature",
         "no webhook-signature entry matches"),
        ({"webhook-timestamp": "1614265330"}, b'{"a":1}', 401, "bad_signature",
         "webhook-timestamp is"),
        ({"Content-Type": "text/plain"}, b'{"a":1}', 415, "malformed",
         "content type 'text/plain', want application/json or XML"),
        ({}, b'{"a":', 400, "malformed", "body is not JSON"),
        ({}, b"x" * 2000, 413, "malformed", "body over 1024 bytes"),
    ],
    ids=["missing-signature", "bad-signature", "stale-timestamp", "content-type", "json", "size"],
)  # fmt: skip
async def test_refusals_answer_and_count(
    signed_server: Client,
    registry: CollectorRegistry,
    headers: dict[str, str],
    body: bytes,
    status: int,
    outcome: str,
    text: str,
) -> None:
    sent = {**standard_headers(body, "msg_x"), **headers}
    sent = {k: v for k, v in sent.items() if v}
    async with signed_server.post(PATH, data=body, headers=sent) as resp:
        assert resp.status == status
        assert text in await resp.text()
    assert arrivals_count(registry, outcome) == 1
    assert arrivals_count(registry, "unmatched") == 0  # never offered


async def test_chunked_body_over_the_limit(
    signed_server: Client, registry: CollectorRegistry
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 512

    headers = {"Content-Type": "application/json"}
    async with signed_server.post(PATH, data=chunks(), headers=headers) as resp:
        assert resp.status == 413
    assert arrivals_count(registry, "malformed") == 1


async def test_unknown_path_and_method(signed_server: Client, registry: CollectorRegistry) -> None:
    async with signed_server.post("/hooks/nope", json={}) as resp:
        assert resp.status == 404
    async with signed_server.get(PATH) as resp:
        assert resp.status == 405
    assert registry.get_sample_value("hopwatch_arrivals_total", {}) is None


async def test_configured_answer(webhook_server: ServerFactory) -> None:
    client = await webhook_server(
        routes_from_steps([step(signature=SIGNED, respond={"status": 200, "body": {"ok": True}})])
    )
    body = b'{"a": 1}'
    async with client.post(PATH, data=body, headers=standard_headers(body, "m1")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"ok": True}


async def test_unresolvable_secret_is_our_fault(
    webhook_server: ServerFactory, registry: CollectorRegistry
) -> None:
    config = step(signature={"scheme": "github", "secret": "${env:HOPWATCH_NO_SUCH_SECRET}"})
    client = await webhook_server(routes_from_steps([config]))
    async with client.post(PATH, json={}, headers={"X-Hub-Signature-256": "sha256=00"}) as resp:
        assert resp.status == 500
        assert "HOPWATCH_NO_SUCH_SECRET" not in await resp.text()
    assert arrivals_count(registry, "bad_signature") == 1


async def test_unsigned_path_accepts_and_uses_delivery_headers(
    webhook_server: ServerFactory, registry: CollectorRegistry
) -> None:
    client = await webhook_server([WebhookRoute(PATH)])
    for _ in range(2):
        async with client.post(PATH, json={"a": 1}, headers={"X-GitHub-Delivery": "g1"}) as r:
            assert r.status == 202
    assert arrivals_count(registry, "unmatched") == 1
    assert arrivals_count(registry, "duplicate") == 1


# -- routes ---------------------------------------------------------------------------------


def test_routes_from_steps_dedupe_and_conflicts() -> None:
    a = step(signature=SIGNED)
    b = step(name="other", signature=SIGNED)
    c = step(name="third", path="/hooks/x")
    routes = routes_from_steps([a, b, c])
    assert [(r.path, r.step) for r in routes] == [
        (PATH, "fulfilment_webhook"),
        ("/hooks/x", "third"),
    ]
    clash = routes_from_steps([a, step(name="loud", signature=SIGNED, respond={"status": 500})])
    from aiohttp import web

    with pytest.raises(ConfigError, match="steps fulfilment_webhook, loud give different respond"):
        install_webhook_routes(web.Application(), clash, Correlator(), None)


async def test_shared_path_accepts_any_flows_signature(
    webhook_server: ServerFactory, registry: CollectorRegistry
) -> None:
    other_secret = "whsec_" + "b3RoZXIgc2VjcmV0IGtleQ=="
    steps = [
        step(signature=SIGNED),
        step(name="b", signature={"scheme": "standard_webhooks", "secret": other_secret}),
    ]
    client = await webhook_server(routes_from_steps(steps))
    body = b'{"a": 1}'
    for msg_id, secret in (("m1", SW_SECRET), ("m2", other_secret)):
        headers = standard_headers(body, msg_id, secret=secret)
        async with client.post(PATH, data=body, headers=headers) as resp:
            assert resp.status == 202
    forged = standard_headers(body, "m3", secret="whsec_" + "Zm9yZ2Vk")
    async with client.post(PATH, data=body, headers=forged) as resp:
        assert resp.status == 401
    assert arrivals_count(registry, "bad_signature") == 1


# -- the webhook_await kind end to end ------------------------------------------------------


async def test_signed_webhook_matched_checked_extracted_and_timed(
    webhook_server: ServerFactory, run_context: ContextFactory, registry: CollectorRegistry
) -> None:
    config = step(
        signature=SIGNED,
        match={"json": {"$.order_id": "{{ steps.create_order.order_id }}"}},
        expect={"json": {"$.status": "fulfilled"}, "headers": {"traceparent": "00-.*"}},
        extract={"shipment": {"json": "$.shipment"}, "trace": {"header": "traceparent"}},
    )
    client = await webhook_server(routes_from_steps([config]))
    ctx = order_ctx(run_context)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def deliver_later() -> None:
        await asyncio.sleep(0.05)  # the system under watch takes its time
        await post(client, {"order_id": 41, "status": "fulfilled"}, "m0")  # another order
        await post(
            client,
            {"order_id": 42, "status": "fulfilled", "shipment": "s-9"},
            "m1",
            traceparent=traceparent,
        )

    sender = asyncio.create_task(deliver_later())
    outcome = await run_step(config, ctx)
    await sender
    assert outcome.vars == {"shipment": "s-9", "trace": traceparent}
    assert outcome.latency_s is not None and 0.05 <= outcome.latency_s < 2
    assert outcome.attributes["webhook.delivery_id"] == "m1"
    assert outcome.attributes["webhook.early"] is False
    assert arrivals_count(registry, "matched") == 1
    assert arrivals_count(registry, "unmatched") == 1


async def test_webhook_before_its_waiter_is_matched(
    webhook_server: ServerFactory, run_context: ContextFactory, registry: CollectorRegistry
) -> None:
    config = step(
        signature=SIGNED, match={"json": {"$.order_id": "{{ steps.create_order.order_id }}"}}
    )
    client = await webhook_server(routes_from_steps([config]))

    async def trigger() -> None:  # the webhook beats the trigger's own response
        assert await post(client, {"order_id": 42}, "m1") == (202, "")

    outcome = await run_step(config, order_ctx(run_context), trigger)
    assert outcome.attributes["webhook.early"] is True
    assert outcome.latency_s is not None and outcome.latency_s >= 0
    assert arrivals_count(registry, "matched") == 1


async def test_default_match_is_the_marker_header(
    webhook_server: ServerFactory, run_context: ContextFactory, registry: CollectorRegistry
) -> None:
    config = step(signature=SIGNED)
    client = await webhook_server(routes_from_steps([config]))

    async def trigger() -> None:
        await post(client, {"a": 1}, "m0", **{"X-Hopwatch-Run": "someone-else"})
        await post(client, {"a": 2}, "m1", **{"x-hopwatch-run": "run1"})

    outcome = await run_step(config, run_context("run1"), trigger)
    assert outcome.attributes["webhook.delivery_id"] == "m1"


async def test_drop_is_not_received(
    webhook_server: ServerFactory, run_context: ContextFactory, registry: CollectorRegistry
) -> None:
    config = step(
        signature=SIGNED, within="100ms", match={"header": {"X-Ref": "{{ run.correlation }}"}}
    )
    await webhook_server(routes_from_steps([config]))
    with pytest.raises(NotReceived) as caught:
        await run_step(config, run_context("run1"))
    assert caught.value.message == (
        f"no delivery on {PATH} with header X-Ref='hw-run1' within 0.1s"
    )


async def test_delay_past_deadline_is_not_received_then_late(
    webhook_server: ServerFactory, run_context: ContextFactory, registry: CollectorRegistry
) -> None:
    config = step(
        signature=SIGNED,
        within="100ms",
        match={"json": {"$.order_id": "{{ steps.create_order.order_id }}"}},
    )
    client = await webhook_server(routes_from_steps([config]))
    with pytest.raises(NotReceived):
        await run_step(config, order_ctx(run_context, "run1", 42))
    # The next run waits for its own order; run 1's delivery finally comes in the meantime.
    second = order_ctx(run_context, "run2", 43)

    async def trigger() -> None:
        assert await post(client, {"order_id": 42}, "m-late") == (202, "")
        assert await post(client, {"order_id": 43}, "m-on-time") == (202, "")

    outcome = await run_step(config, second, trigger)
    assert outcome.attributes["webhook.delivery_id"] == "m-on-time"
    assert arrivals_count(registry, "late") == 1
    assert arrivals_count(registry, "matched") == 1


async def test_forged_webhook_is_refused_and_never_matched(
    webhook_server: ServerFactory, run_context: ContextFactory, registry: CollectorRegistry
) -> None:
    config = step(signature=SIGNED, within="100ms", match={"json": {"$.order_id": 42}})
    client = await webhook_server(routes_from_steps([config]))

    async def trigger() -> None:
        forged = standard_headers(b'{"order_id": 42}', "m1", secret="whsec_Zm9yZ2VkIGtleQ==")
        async with client.post(PATH, data=b'{"order_id": 42}', headers=forged) as resp:
            assert resp.status == 401

    # A rotated secret is not a dead sender: the step names the refusal, not not_received.
    with pytest.raises(SignatureInvalid) as caught:
        await run_step(config, run_context(), trigger)
    assert caught.value.message == (
        f"nothing accepted on {PATH} by the deadline: 1 delivery refused (1 bad signature)"
    )
    assert arrivals_count(registry, "bad_signature") == 1
    assert arrivals_count(registry, "matched") == 0


@pytest.mark.parametrize(
    ("refusals", "error", "detail"),
    [
        (["stale", "forged", "forged"], SignatureInvalid,
         "3 deliveries refused (1 stale timestamp, 2 bad signature)"),
        (["text"], AssertionFailed, "1 delivery refused (1 wrong content type)"),
        (["text", "forged"], SignatureInvalid,
         "2 deliveries refused (1 wrong content type, 1 bad signature)"),
    ],
    ids=["signature", "content-type", "both"],
)  # fmt: skip
async def test_only_refused_deliveries_name_why(
    webhook_server: ServerFactory,
    run_context: ContextFactory,
    refusals: list[str],
    error: type[Exception],
    detail: str,
) -> None:
    config = step(signature=SIGNED, within="100ms", match={"json": {"$.order_id": 42}})
    client = await webhook_server(routes_from_steps([config]))
    body = b'{"order_id": 42}'
    headers = {
        "stale": standard_headers(body, "m1", stamp=int(time.time()) - 3600),
        "forged": standard_headers(body, "m2", secret="whsec_Zm9yZ2VkIGtleQ=="),
        "text": {**standard_headers(body, "m3"), "Content-Type": "text/plain"},
    }

    async def trigger() -> None:
        for which in refusals:
            async with client.post(PATH, data=body, headers=headers[which]) as resp:
                assert resp.status in (401, 415)

    with pytest.raises(error) as caught:
        await run_step(config, run_context(), trigger)
    assert caught.value.message == f"nothing accepted on {PATH} by the deadline: {detail}"  # type: ignore[attr-defined]


async def test_refusals_beside_other_deliveries_stay_not_received(
    webhook_server: ServerFactory, run_context: ContextFactory
) -> None:
    """Another sender's delivery got through: the refusal may not be this run's."""
    config = step(signature=SIGNED, within="100ms", match={"json": {"$.order_id": 42}})
    client = await webhook_server(routes_from_steps([config]))

    async def trigger() -> None:
        forged = standard_headers(b'{"order_id": 42}', "m1", secret="whsec_Zm9yZ2VkIGtleQ==")
        async with client.post(PATH, data=b'{"order_id": 42}', headers=forged) as resp:
            assert resp.status == 401
        assert await post(client, {"order_id": 7}, "m2") == (202, "")

    with pytest.raises(NotReceived) as caught:
        await run_step(config, run_context(), trigger)
    assert "1 other arrival(s) on it did not match; 1 refused: bad signature" in str(
        caught.value.message
    )


async def test_this_runs_delivery_failing_the_rest_of_the_rule_is_an_assertion(
    webhook_server: ServerFactory, run_context: ContextFactory
) -> None:
    config = step(
        signature=SIGNED,
        within="100ms",
        match={"json": {"$.order_id": "{{ steps.create_order.order_id }}", "$.type": "done"}},
    )
    client = await webhook_server(routes_from_steps([config]))

    async def trigger() -> None:
        assert await post(client, {"order_id": 42, "type": "failed"}, "m1") == (202, "")
        # another run's: carries a literal value of the rule only, so it says nothing
        assert await post(client, {"order_id": 7, "type": "done"}, "m2") == (202, "")

    async def during() -> None:
        assert await post(client, {"order_id": 42, "type": "refunded"}, "m3") == (202, "")

    with pytest.raises(AssertionFailed) as caught:
        await run_step(config, order_ctx(run_context), trigger, before_run=during)
    assert caught.value.message == (
        f"2 arrival(s) on {PATH} carried this run's values but not all the step matches on: "
        "$.type 'failed', want 'done'"
    )
    assert caught.value.excerpt is not None and '"failed"' in caught.value.excerpt


async def test_duplicate_delivery_fails_within_window_and_is_counted(
    webhook_server: ServerFactory, run_context: ContextFactory, registry: CollectorRegistry
) -> None:
    config = step(signature=SIGNED, match={"json": {"$.order_id": 42}}, duplicate_window="2s")
    client = await webhook_server(routes_from_steps([config]))
    body = b'{"order_id": 42}'
    headers = standard_headers(body, "m1")

    async def trigger() -> None:
        async with client.post(PATH, data=body, headers=headers) as resp:
            assert resp.status == 202

    async def replay() -> None:  # the sender retries the same delivery
        async with client.post(PATH, data=body, headers=headers) as resp:
            assert resp.status == 202

    async def replay_soon() -> None:
        await asyncio.sleep(0.05)
        await replay()

    sender = asyncio.create_task(replay_soon())
    with pytest.raises(
        Duplicate, match=r"a second delivery matching this run came \(delivery id m1\)"
    ):
        await run_step(config, run_context(), trigger)
    await sender
    assert arrivals_count(registry, "matched") == 1
    assert arrivals_count(registry, "duplicate") == 1


async def test_duplicate_without_window_is_only_counted(
    webhook_server: ServerFactory, run_context: ContextFactory, registry: CollectorRegistry
) -> None:
    config = step(signature=SIGNED, match={"json": {"$.order_id": 42}})
    client = await webhook_server(routes_from_steps([config]))

    async def trigger() -> None:
        await post(client, {"order_id": 42}, "m1")
        await post(client, {"order_id": 42}, "m1")  # a retry before the step even waits

    await run_step(config, run_context(), trigger)
    await post(client, {"order_id": 42}, "m1")  # replayed id
    await post(client, {"order_id": 42}, "m2")  # a second delivery of the same event
    assert arrivals_count(registry, "duplicate") == 3
    assert arrivals_count(registry, "matched") == 1


async def test_duplicate_already_known_fails_without_waiting_the_window(
    webhook_server: ServerFactory, run_context: ContextFactory
) -> None:
    config = step(signature=SIGNED, match={"json": {"$.order_id": 42}}, duplicate_window="1m")
    client = await webhook_server(routes_from_steps([config]))

    async def trigger() -> None:
        await post(client, {"order_id": 42}, "m1")
        await post(client, {"order_id": 42}, "m2")

    async with asyncio.timeout(5):
        with pytest.raises(Duplicate, match="delivery id m2"):
            await run_step(config, run_context(), trigger)


@pytest.mark.parametrize(
    ("latency_from", "doc", "headers"),
    [
        ("header:X-Sent-At", {"order_id": 42}, {"X-Sent-At": "{now_s}"}),
        ("json:$.sent_ms", {"order_id": 42, "sent_ms": "{now_ms}"}, {}),
        ("json:$.sent", {"order_id": 42, "sent": "{iso}"}, {}),
    ],
    ids=["header-seconds", "json-millis", "json-iso"],
)
async def test_latency_from_sender_timestamp(
    webhook_server: ServerFactory,
    run_context: ContextFactory,
    latency_from: str,
    doc: dict[str, Any],
    headers: dict[str, str],
) -> None:
    config = step(signature=SIGNED, match={"json": {"$.order_id": 42}}, latency_from=latency_from)
    client = await webhook_server(routes_from_steps([config]))
    sent = time.time() - 3.0  # the sender stamped it 3 s before it reached us
    values = {
        "{now_s}": f"{sent:.3f}",
        "{now_ms}": int(sent * 1000),
        "{iso}": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sent))
        + f".{int(sent % 1 * 1e6):06d}Z",
    }
    doc = {k: values.get(v, v) if isinstance(v, str) else v for k, v in doc.items()}
    headers = {k: str(values.get(v, v)) for k, v in headers.items()}

    async def trigger() -> None:
        await post(client, doc, "m1", **headers)

    outcome = await run_step(config, run_context(), trigger)
    assert outcome.latency_s is not None and 2.9 < outcome.latency_s < 4.0


async def test_latency_from_missing_sender_timestamp(
    webhook_server: ServerFactory, run_context: ContextFactory
) -> None:
    config = step(signature=SIGNED, match={"json": {"$.order_id": 42}}, latency_from="json:$.sent")
    client = await webhook_server(routes_from_steps([config]))

    async def trigger() -> None:
        await post(client, {"order_id": 42}, "m1")

    with pytest.raises(AssertionFailed, match=r"latency_from: \$.sent missing in the delivery"):
        await run_step(config, run_context(), trigger)


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"expect": {"json": {"$.status": "fulfilled"}}}, AssertionFailed,
         r"\$\.status is 'pending', want 'fulfilled'"),
        ({"expect": {"max_latency": "1ms"}, "latency_from": "json:$.sent"}, AssertionFailed,
         r"latency 100\d\dms, want <= 1ms"),
        ({"extract": {"x": {"json": "$.nope"}}}, ExtractFailed, r"x: \$\.nope not in body"),
    ],
    ids=["json", "max-latency", "extract"],
)  # fmt: skip
async def test_wrong_content_fails_the_step(
    webhook_server: ServerFactory,
    run_context: ContextFactory,
    fields: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    config = step(signature=SIGNED, match={"json": {"$.order_id": 42}}, **fields)
    client = await webhook_server(routes_from_steps([config]))

    async def trigger() -> None:
        await post(client, {"order_id": 42, "status": "pending", "sent": time.time() - 10}, "m1")

    with pytest.raises(error) as caught:
        await run_step(config, run_context(), trigger)
    assert re.fullmatch(message, str(caught.value))
    assert caught.value.excerpt and '"order_id": 42' in caught.value.excerpt  # type: ignore[attr-defined]
    assert caught.value.attributes["webhook.delivery_id"] == "m1"  # type: ignore[attr-defined]


async def test_skipped_step_releases_its_registration(
    run_context: ContextFactory, correlator: Correlator
) -> None:
    ctx = run_context()
    ctx.step = "hook"
    PROBE.expect(step(), ctx)
    assert correlator.stats()["pending"] == 1
    for hook in ctx.run_state.pop("_on_release"):  # what the runner does at run end
        hook()
    assert correlator.stats()["pending"] == 0
    assert expectation_key(KIND, "hook") in ctx.run_state


async def test_run_without_expect_registers_itself(
    webhook_server: ServerFactory, run_context: ContextFactory, registry: CollectorRegistry
) -> None:
    config = step(signature=SIGNED, match={"json": {"$.order_id": 42}})
    client = await webhook_server(routes_from_steps([config]))
    ctx = run_context()
    ctx.step = config.name
    task = asyncio.create_task(PROBE.run(config, ctx))
    await asyncio.sleep(0)  # run() registers before its first await
    assert expectation_key(KIND, config.name) in ctx.run_state
    await post(client, {"order_id": 42}, "m1")
    assert (await task).attributes["webhook.delivery_id"] == "m1"


# -- memory stays bounded through the real receiver -----------------------------------------


async def test_random_webhooks_keep_tables_bounded(
    webhook_server: ServerFactory, registry: CollectorRegistry, correlator: Correlator
) -> None:
    correlator.max_early = 50
    correlator.max_delivery_ids = 100
    client = await webhook_server([WebhookRoute(PATH)])
    correlator.expect(PATH, "r1", "hook", time.monotonic() + 60)  # keeps arrivals claimable
    rng = random.Random(3)
    gate = asyncio.Semaphore(16)

    async def send_one() -> None:
        ref = f"{rng.getrandbits(64):016x}"
        async with gate, client.post(PATH, json={"ref": ref}, headers={"webhook-id": ref}) as r:
            assert r.status == 202

    await asyncio.gather(*(send_one() for _ in range(400)))
    stats = correlator.stats()
    assert stats["early"] == 50
    assert stats["delivery_ids"] == 100
    assert arrivals_count(registry, "unmatched") == 350


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"latency_from": "sender"}, "latency_from 'sender': want trigger, step:<name>"),
        ({"latency_from": "json:$$["}, "bad JSON path"),
        ({"expect": {"status": 200}}, "expect.status does not apply to a received webhook"),
        ({"path": "hooks"}, "String should match pattern"),
        ({"within": None}, "not a duration"),
        ({"respond": {"status": 99}}, "greater than or equal to 200"),
        ({"match": {"json": {"$[": "x"}}}, "bad JSON path"),
        ({"signature": {"scheme": "github"}}, "Field required"),
        ({"extra": 1}, "Extra inputs are not permitted"),
    ],
    ids=["latency-from", "latency-path", "status", "path", "within", "respond", "match", "sig",
         "extra"],
)  # fmt: skip
def test_bad_step_configs(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        step(**fields)
    assert message in str(caught.value)


def test_config_defaults() -> None:
    config = step()
    assert config.respond.status == 202
    assert config.duplicate_window == 0
    assert config.latency_from == "trigger"
    assert config.match is None and config.signature is None


async def test_own_latency_starts_when_the_trigger_ended_and_the_wait_is_described(
    webhook_server: ServerFactory, run_context: ContextFactory
) -> None:
    """The hop's latency runs from its trigger's start and contains the trigger's time; its
    own part starts when the trigger ended."""
    config = step(signature=SIGNED, match={"json": {"$.order_id": 42}}, duplicate_window="50ms")
    client = await webhook_server(routes_from_steps([config]))
    ctx = run_context()

    async def slow_trigger() -> None:
        await asyncio.sleep(0.1)  # stands for a slow API call: time is what is measured

    async def deliver() -> None:
        ctx.step_ended["create_order"] = time.monotonic()
        assert await post(client, {"order_id": 42}, "m1") == (202, "")

    outcome = await run_step(config, ctx, slow_trigger, before_run=deliver)
    assert outcome.latency_s is not None and outcome.latency_s >= 0.1
    assert outcome.own_latency_s is not None and outcome.own_latency_s < 0.05
    assert outcome.attributes["wait.for"] == f"delivery on {PATH} with $.order_id=42"
    assert outcome.attributes["wait.duplicate_window_s"] == 0.05
    assert 0 <= outcome.attributes["wait.arrived_s"] < 0.05


async def test_a_value_every_run_shares_does_not_make_an_arrival_this_runs(
    webhook_server: ServerFactory, run_context: ContextFactory
) -> None:
    """`{{ run.flow }}` is a template, but every run of the flow has it: another run's delivery
    carrying it is not this run's gone wrong."""
    config = step(
        signature=SIGNED,
        within="100ms",
        match={
            "json": {"$.flow": "{{ run.flow }}", "$.order_id": "{{ steps.create_order.order_id }}"}
        },
    )
    client = await webhook_server(routes_from_steps([config]))

    async def trigger() -> None:
        assert await post(client, {"flow": "checkout", "order_id": 7}, "m1") == (202, "")

    with pytest.raises(NotReceived):
        await run_step(config, order_ctx(run_context), trigger)
