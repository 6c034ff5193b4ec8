"""Poison records on a watched topic, against a real Tansu broker: each is counted `malformed`
and skipped, the shared consumer never restarts nor re-reads, and the next run still passes."""

from __future__ import annotations

import json

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from monitor.demo.broker import TansuBroker
from probes.base import StepOutcome
from tests.test_kafka import (  # noqa: F401 - make_env is a fixture, used by name
    MakeEnv,
    arrivals,
    cluster,
    consume,
    make_env,
    produce,
    steps,
)

pytestmark = pytest.mark.kafka

KEY = b"poison-key"  # every record on one partition: the run's record comes after the poison
POISON = {
    "deep": b"[" * 10_000 + b"]" * 10_000,
    "deep_object": b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    "not_utf8": b'{"a": "\xff\xfe\xfa"}',
    "broken": b'{"a": ',
    "huge": b'{"a": "' + b"x" * (1024 * 1024 + 10) + b'"}',
    "megabyte_of_text": b"x" * 1_000_000,
    "not_json": b"this is not json at all",
}


async def test_poison_is_counted_malformed_and_skipped(
    kafka_broker: TansuBroker,
    make_env: MakeEnv,  # noqa: F811
    unique_topic: str,
    registry: CollectorRegistry,
) -> None:
    env = await make_env({"main": cluster(kafka_broker.bootstrap)}, {"main": [unique_topic]})
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_broker.bootstrap, max_request_size=4 * 1024 * 1024
    )
    await producer.start()
    try:
        for value in POISON.values():
            await producer.send_and_wait(unique_topic, value, key=KEY)
    finally:
        await producer.stop()
    flow = steps(
        produce(unique_topic, key=KEY.decode()),
        consume(unique_topic, expect={"json": {"$.sku": "probe-1"}}),
    )
    for _ in range(2):
        results = await env.run(flow)
        assert all(isinstance(r, StepOutcome) for r in results), results
    health = env.clients.health()["main"]
    assert health.consumer_restarts == 0
    assert health.consumer == "up"
    assert arrivals(registry, "malformed") == len(POISON)
    assert arrivals(registry, "matched") == 2
    assert arrivals(registry, "duplicate") == 0
    assert arrivals(registry, "unmatched") == 0
    assert json.dumps(POISON["not_json"].decode())  # plain text: malformed only when unclaimed
