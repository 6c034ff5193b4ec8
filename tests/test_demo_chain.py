"""The demo chain end to end (API → Kafka → worker → signed webhook → read-back → the worker's
row) on a real broker, with each fault showing as the right broken link and reason."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from monitor.demo.webhooks import DEMO_SECRET, sign_standard_webhook
from tests.fixtures.demo import Demo, wait_until

CHAIN = ["create_order", "order_event", "fulfilment_webhook", "read_back", "order_row"]


def arrivals(demo: Demo, source: str, outcome: str) -> float:
    labels = {"source": source, "outcome": outcome}
    return demo.registry.get_sample_value("hopwatch_arrivals_total", labels) or 0.0


async def test_every_hop_of_the_chain_passes_and_is_timed(demo: Demo) -> None:
    for flow in ("checkout", "order_via_kafka", "shop_health"):
        result = await demo.run(flow)
        assert result.outcome == "success", [(s.name, s.reason, s.message) for s in result.steps]
    result = await demo.run("checkout")
    assert [s.name for s in result.hops] == CHAIN
    assert all(s.latency_s is not None and s.latency_s > 0 for s in result.hops)
    labels = {"flow": "checkout", "variant": "stable", "location": "local"}
    for step, kind in zip(
        CHAIN, ["http", "kafka_consume", "webhook_await", "http_poll", "sql"], strict=True
    ):
        count = demo.registry.get_sample_value(
            "hopwatch_step_duration_seconds_count", {**labels, "step": step, "kind": kind}
        )
        assert count == 2
        own = demo.registry.get_sample_value(
            "hopwatch_step_own_duration_seconds_count", {**labels, "step": step, "kind": kind}
        )
        # waiting hops also export their own part, from the previous step's end
        assert own == (2 if kind in ("kafka_consume", "webhook_await") else None)
    assert arrivals(demo, "kafka", "matched") >= 2
    assert arrivals(demo, "webhook", "matched") >= 3


async def test_the_chain_ends_at_the_row_the_worker_wrote(demo: Demo, tmp_path: Path) -> None:
    result = await demo.run("checkout")
    assert result.outcome == "success", [(s.name, s.reason, s.message) for s in result.steps]
    with contextlib.closing(sqlite3.connect(tmp_path / "demo-orders.db")) as db:
        rows = db.execute(
            "SELECT status, synthetic_run FROM fulfilled_orders WHERE ref = ?",
            (result.correlation,),
        ).fetchall()
    # The row carries the run's marker, so the shop's own figures can leave probes out.
    assert rows == [("fulfilled", result.run_id)]


@pytest.mark.parametrize(
    ("faults", "step", "reason"),
    [
        ({"webhook_drop": True}, "fulfilment_webhook", "not_received"),
        # a rotated secret is not a dead sender: the refusals are named
        ({"webhook_bad_signature": True}, "fulfilment_webhook", "signature"),
        ({"webhook_duplicate": True}, "fulfilment_webhook", "duplicate"),
        ({"worker_stopped": True}, "fulfilment_webhook", "not_received"),
        ({"table_drop": True}, "order_row", "assertion"),
        ({"status": 503}, "create_order", "http_status"),
        ({"wrong_body": True}, "create_order", "assertion"),
    ],
)
async def test_a_fault_breaks_the_right_link_for_the_right_reason(
    demo: Demo, faults: dict[str, object], step: str, reason: str
) -> None:
    await demo.set_faults(**faults)
    result = await demo.run("checkout")
    broken = result.broken
    assert broken is not None, [(s.name, s.status) for s in result.steps]
    assert (broken.name, broken.reason) == (step, reason), broken.message
    later = [s.status for s in result.hops[result.hops.index(broken) + 1 :]]
    assert set(later) <= {"skipped"}
    if "webhook_bad_signature" in faults:
        assert arrivals(demo, "webhook", "bad_signature") >= 1
        assert "refused (" in (broken.message or "") and "bad signature)" in (broken.message or "")
    await demo.clear_faults()
    result = await demo.run("checkout")
    assert result.outcome == "success", [(s.name, s.reason, s.message) for s in result.steps]


async def test_a_forged_webhook_gets_401_and_is_counted(demo: Demo) -> None:
    body = b'{"order_id": "ord-1"}'
    headers = {
        "Content-Type": "application/json",
        "webhook-id": "msg_forged",
        "webhook-timestamp": str(int(time.time())),
        "webhook-signature": sign_standard_webhook(
            "whsec_" + "QUJD" * 8, "msg_forged", int(time.time()), body
        ),
    }
    async with aiohttp.ClientSession() as http:
        url = f"{demo.public_url}/hooks/fulfilment"
        async with http.post(url, data=body, headers=headers) as resp:
            assert resp.status == 401
        good = dict(headers)
        good["webhook-signature"] = sign_standard_webhook(
            DEMO_SECRET, "msg_forged", int(headers["webhook-timestamp"]), body
        )
        async with http.post(url, data=body, headers=good) as resp:
            assert resp.status == 202  # authentic but unmatched: senders must not retry
    assert arrivals(demo, "webhook", "bad_signature") == 1
    await wait_until(lambda: arrivals(demo, "webhook", "unmatched") == 1)


async def test_a_delayed_webhook_is_not_received_then_late_never_credited(demo: Demo) -> None:
    await demo.set_faults(webhook_delay_ms=4000)  # the step waits 3s
    result = await demo.run("checkout")
    assert result.broken is not None
    assert (result.broken.name, result.broken.reason) == ("fulfilment_webhook", "not_received")
    await demo.clear_faults()
    await wait_until(lambda: arrivals(demo, "webhook", "late") >= 1, timeout=10)
    result = await demo.run("checkout")
    assert result.outcome == "success"


async def test_a_retried_webhook_passes_with_the_retry_in_its_latency(demo: Demo) -> None:
    await demo.set_faults(webhook_retry_first=True)
    result = await demo.run("checkout")
    assert result.outcome == "success"
    hop = next(s for s in result.steps if s.name == "fulfilment_webhook")
    assert hop.latency_s is not None and hop.latency_s >= 0.5  # the sender's backoff


async def test_a_slow_consumer_shows_in_the_webhook_hop(demo: Demo) -> None:
    await demo.set_faults(worker_delay_ms=1000)
    result = await demo.run("checkout")
    assert result.outcome == "success"
    hop = next(s for s in result.steps if s.name == "fulfilment_webhook")
    assert hop.latency_s is not None and hop.latency_s >= 1.0


async def test_broker_down_breaks_only_kafka_links_and_heals_without_restart(demo: Demo) -> None:
    await demo.set_faults(broker_stopped=True)
    assert not demo.broker.running
    assert (await demo.run("shop_health")).outcome == "success"
    via_kafka = await demo.run("order_via_kafka")
    assert via_kafka.broken is not None
    assert (via_kafka.broken.name, via_kafka.broken.reason) in {
        ("command", "connect_error"),
        ("command", "timeout"),
    }
    checkout = await demo.run("checkout")
    assert checkout.broken is not None
    assert checkout.broken.name == "order_event"  # the API still answers: HTTP passed
    assert checkout.broken.reason in {"connect_error", "not_received"}
    assert checkout.steps[0].status == "passed"

    await demo.clear_faults()  # the broker comes back (empty, as a replaced broker would)
    assert demo.broker.running
    healed = set()
    deadline = time.monotonic() + 90
    while healed != {"checkout", "order_via_kafka"} and time.monotonic() < deadline:
        for flow in ("checkout", "order_via_kafka"):
            if flow not in healed and (await demo.run(flow)).outcome == "success":
                healed.add(flow)
    assert healed == {"checkout", "order_via_kafka"}


async def test_the_worker_reads_a_broker_back_with_empty_logs_from_the_start(demo: Demo) -> None:
    """Far into the logs when the broker comes back empty, the worker must not wait for its old
    offsets: in the soak it ignored new orders for minutes (true not_received, but not a demo
    that heals)."""
    for _ in range(45):  # ~15 orders on each of the topic's partitions
        assert (await demo.run("checkout")).outcome == "success"
    await demo.set_faults(broker_stopped=True)
    await demo.clear_faults()
    back, streak = time.monotonic(), 0
    while streak < 3:  # healed: three checkouts in a row fulfilled
        assert time.monotonic() - back < 45, "the demo did not heal"
        streak = streak + 1 if (await demo.run("checkout")).outcome == "success" else 0


async def test_the_worker_heals_after_a_long_broker_outage(demo: Demo) -> None:
    """A broker away long enough for the worker to give its consumer up: aiokafka's `stop()` of
    that consumer waited forever on the lost group (its last auto-commit), so the worker never
    made a new one and every later order went unfulfilled (the soak's `never` recoveries)."""
    for _ in range(6):
        assert (await demo.run("checkout")).outcome == "success"
    worker = demo.system.worker
    await demo.set_faults(broker_stopped=True)
    await wait_until(lambda: worker.lost >= 1, timeout=30)  # its log check timed out
    await demo.clear_faults()
    back, streak = time.monotonic(), 0
    while streak < 3:  # healed: three checkouts in a row fulfilled
        assert time.monotonic() - back < 45, "the demo did not heal"
        streak = streak + 1 if (await demo.run("checkout")).outcome == "success" else 0


async def test_the_worker_takes_a_batch_of_records_for_no_log_restart(demo: Demo) -> None:
    """Tansu answers ListOffsets with the last batch's base offset + 1, so after a batch of
    three the end reads two below the worker's position: the worker took that for a broker back
    with empty logs and fulfilled every order again from the start (late webhooks in the
    soak)."""
    from aiokafka import AIOKafkaProducer

    worker = demo.system.worker
    producer = AIOKafkaProducer(bootstrap_servers=demo.system.publisher.bootstrap, linger_ms=50)
    await producer.start()
    try:
        done = worker.processed
        sent = [  # three records in one batch, on one partition; no such orders (404: skipped)
            await producer.send("orders", json.dumps({"order_id": f"none-{i}"}).encode(),
                                partition=0)
            for i in range(3)
        ]  # fmt: skip
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    await wait_until(lambda: worker.processed >= done + 3, timeout=15)
    checks = worker.log_checks
    await wait_until(lambda: worker.log_checks >= checks + 2, timeout=15)
    assert worker.log_restarts == 0
