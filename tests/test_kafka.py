"""Kafka hops against a real Tansu broker: round trip, lost, duplicate, out of order, outages."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import pytest
import yaml
from aiokafka import AIOKafkaProducer
from aiokafka import errors as kafka_errors
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from monitor.correlator import Correlator
from monitor.demo.broker import TansuBroker
from monitor.kafka.clients import KafkaClients
from monitor.kafka.errors import translate
from monitor.kafka.sequence import SEQ_HEADER
from monitor.kafka.settings import KafkaCluster
from monitor.templates import Templates
from probes import KINDS, kafka_consume, kafka_produce
from probes.base import RunInfo, StepConfigBase, StepContext, StepOutcome
from probes.errors import StepFailed

pytestmark = pytest.mark.kafka

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
Step = kafka_produce.Config | kafka_consume.Config
STEP: TypeAdapter[Step] = TypeAdapter(Annotated[Step, Field(discriminator="kind")])


def steps(*raw: dict[str, Any]) -> list[Step]:
    return [STEP.validate_python(r) for r in raw]


def arrivals(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value(
        "hopwatch_arrivals_total", {"source": "kafka", "outcome": outcome}
    )
    return value or 0.0


@dataclass
class Env:
    """The engine's Kafka side, as the monitor wires it: clients feeding a real correlator."""

    clients: KafkaClients
    correlator: Correlator
    templates: Templates = field(default_factory=Templates)

    def context(self, timeout: float) -> StepContext:
        run_id = uuid.uuid4().hex[:16]
        return StepContext(
            run=RunInfo(run_id, f"hw-{run_id}", "flow", "default", "test"),
            variant={},
            steps={},
            renderer=self.templates,
            http=None,  # type: ignore[arg-type]
            marker_header="X-Hopwatch-Run",
            public_url="http://127.0.0.1:1",
            deadline=time.monotonic() + timeout,
            correlator=self.correlator,
            kafka=self.clients,
            propagation=lambda: {"traceparent": TRACEPARENT},
        )

    async def run(
        self, flow: Sequence[Step], run_timeout: float = 10.0
    ) -> list[StepOutcome | StepFailed]:
        """One run, the way the runner does it: expectations first, a time limit per step,
        stop at the first broken link, release the run's registrations at the end."""
        ctx = self.context(run_timeout)
        results: list[StepOutcome | StepFailed] = []
        for step in flow:
            expect = KINDS[step.kind].expect
            if expect is not None:
                ctx.step = step.name
                expect(step, ctx)
        try:
            for step in flow:
                ctx.step = step.name
                ctx.step_started[step.name] = time.monotonic()
                try:
                    async with asyncio.timeout(max(0.0, ctx.deadline - time.monotonic())):
                        outcome = await KINDS[step.kind].probe.run(step, ctx)
                except StepFailed as failed:
                    results.append(failed)
                    break
                ctx.steps[step.name] = outcome.vars
                results.append(outcome)
        finally:
            for hook in ctx.run_state.pop("_on_release", []):
                hook()
        self.last_ctx = ctx
        return results


MakeEnv = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env(registry: CollectorRegistry) -> AsyncIterator[MakeEnv]:
    counter = Counter("hopwatch_arrivals", "arrivals", ["source", "outcome"], registry=registry)
    made: list[KafkaClients] = []

    async def make(clusters: dict[str, KafkaCluster], topics: dict[str, list[str]]) -> Env:
        correlator = Correlator(counter)
        clients = KafkaClients(
            clusters, on_arrival=correlator.offer, topics=topics, arrivals_counter=counter
        )
        made.append(clients)
        await clients.start()
        async with asyncio.timeout(15):
            await clients.wait_consumer()
        return Env(clients, correlator)

    yield make
    for clients in made:
        async with asyncio.timeout(15):
            await clients.close()


def cluster(bootstrap: str, **extra: Any) -> KafkaCluster:
    return KafkaCluster(bootstrap_servers=bootstrap, request_timeout="2s", **extra)


def produce(topic: str, name: str = "send", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "kafka_produce",
        "cluster": "main",
        "topic": topic,
        "key": "{{ run.correlation }}",
        "value": {"ref": "{{ run.correlation }}", "sku": "probe-1"},
        **extra,
    }


def consume(topic: str, name: str = "observe", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "kafka_consume",
        "cluster": "main",
        "topic": topic,
        "within": "5s",
        **extra,
    }


# -- configuration ------------------------------------------------------------------------------


CLUSTERS_YAML = """
main:
  bootstrap_servers: "127.0.0.1:9092"
audit:
  bootstrap_servers: ["kafka-1.internal:9093", "kafka-2.internal:9093"]
  client_id: hopwatch-eu
  security_protocol: SASL_SSL
  sasl_mechanism: SCRAM-SHA-512
  sasl_username: "${env:AUDIT_USER}"
  sasl_password: "${env:AUDIT_PASSWORD}"
  ssl_cafile: /etc/ssl/certs/ca-certificates.crt
  request_timeout: 5s
"""


def test_two_clusters_parse() -> None:
    clusters = TypeAdapter(dict[str, KafkaCluster]).validate_python(yaml.safe_load(CLUSTERS_YAML))
    assert clusters["main"].servers == ["127.0.0.1:9092"]
    assert clusters["main"].security_protocol == "PLAINTEXT"
    audit = clusters["audit"]
    assert audit.servers == ["kafka-1.internal:9093", "kafka-2.internal:9093"]
    assert audit.request_timeout == 5.0
    assert "${env:AUDIT_PASSWORD}" not in repr(audit)  # a secret reference is never shown


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "bootstrap_servers\n  Field required"),
        (
            {"bootstrap_servers": "h:1", "security_protocol": "SASL_SSL"},
            "SASL_SSL needs sasl_mechanism, sasl_username and sasl_password",
        ),
        (
            {"bootstrap_servers": "h:1", "sasl_username": "u"},
            "sasl_username need security_protocol SASL_*",
        ),
        (
            {"bootstrap_servers": "h:1", "ssl_cafile": "/ca.pem"},
            "ssl_cafile need security_protocol SSL or SASL_SSL",
        ),
        (
            {"bootstrap_servers": "h:1", "security_protocol": "SSL", "ssl_certfile": "/c.pem"},
            "give ssl_certfile and ssl_keyfile together",
        ),
        ({"bootstrap_servers": "h:1", "request_timeout": "0s"}, "must be greater than 0"),
        ({"bootstrap_servers": "h:1", "acks": "all"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_cluster_config(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        KafkaCluster.model_validate(raw)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (produce("t", value={"a": 1}, raw_value="x"), "give value or raw_value, not both"),
        (produce("t", acks=2), "Input should be 'all', 0 or 1"),
        (consume("{{ run.id }}"), "topic must be a literal"),
        (consume("t", latency_from="wall"), "want trigger, step:<name> or record"),
        (consume("t", expect={"status": 200}), "expect.status does not apply to a Kafka record"),
        (consume("t", match={"json": {"$..[": 1}}), "bad JSON path"),
        ({**consume("t"), "within": None}, "kafka_consume.within\n  Value error, not a duration"),
        (consume("t", within="-1s"), "not a duration"),
    ],
)
def test_bad_step_config(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        STEP.validate_python(raw)
    assert message in str(caught.value)


@pytest.mark.parametrize("model", [KafkaCluster, kafka_produce.Config, kafka_consume.Config])
def test_every_field_states_its_default(model: type[BaseModel]) -> None:
    for name, info in model.model_fields.items():
        text = (info.description or "").lower()
        if name in StepConfigBase.model_fields or name == "kind":
            continue  # the fields every kind shares are described in probes/base.py
        assert "default" in text or "required" in text, name


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (kafka_errors.KafkaConnectionError("x"), "connect_error"),
        (kafka_errors.NodeNotReadyError("x"), "connect_error"),
        (kafka_errors.KafkaTimeoutError("x"), "timeout"),
        (kafka_errors.RequestTimedOutError("x"), "timeout"),
        (kafka_errors.TopicAuthorizationFailedError("x"), "error"),
        (TimeoutError(), "timeout"),
        (ConnectionRefusedError(111, "refused"), "connect_error"),
    ],
)
def test_translate(exc: BaseException, reason: str) -> None:
    assert translate(exc, "produce").reason == reason


# -- against the broker -------------------------------------------------------------------------


async def test_round_trip(
    kafka_broker: TansuBroker, make_env: MakeEnv, unique_topic: str, registry: CollectorRegistry
) -> None:
    env = await make_env({"main": cluster(kafka_broker.bootstrap)}, {"main": [unique_topic]})
    flow = steps(
        produce(unique_topic),
        consume(
            unique_topic,
            expect={"json": {"$.ref": "{{ run.correlation }}"}, "max_latency": "3s"},
            extract={
                "sku": {"json": "$.sku"},
                "seq": {"header": SEQ_HEADER},
                "marker": {"header": "X-Hopwatch-Run"},
                "correlation": {"header": "hopwatch-correlation"},
                "traceparent": {"header": "traceparent"},
            },
        ),
    )
    sent, seen = await env.run(flow)
    assert isinstance(sent, StepOutcome), sent
    assert isinstance(seen, StepOutcome), seen
    assert sent.latency_s is not None and 0 < sent.latency_s < 2
    assert seen.latency_s is not None and sent.latency_s <= seen.latency_s < 3
    assert seen.vars["sku"] == "probe-1"
    assert int(seen.vars["seq"]) == sent.vars["seq"]
    assert seen.attributes["messaging.kafka.offset"] == sent.vars["offset"]
    assert arrivals(registry, "matched") == 1

    # The record carried the marker, the correlation id and the trace context as headers.
    assert seen.vars["marker"] == env.last_ctx.run.id
    assert seen.vars["correlation"] == env.last_ctx.run.correlation
    assert seen.vars["traceparent"] == TRACEPARENT

    # A second run on the same shared consumer passes too, and sees only its own record.
    again = await env.run(flow)
    assert all(isinstance(r, StepOutcome) for r in again), again
    assert arrivals(registry, "matched") == 2


async def test_match_on_key_and_raw_value(
    kafka_broker: TansuBroker, make_env: MakeEnv, unique_topic: str
) -> None:
    env = await make_env({"main": cluster(kafka_broker.bootstrap)}, {"main": [unique_topic]})
    flow = steps(
        produce(unique_topic, value=None, raw_value="plain {{ run.id }}", acks=1),
        consume(
            unique_topic,
            match={"key": "{{ run.correlation }}"},
            expect={"body": "^plain [0-9a-f]+$"},
            latency_from="step:send",
        ),
    )
    results = await env.run(flow)
    assert all(isinstance(r, StepOutcome) for r in results), results


async def test_not_received(
    kafka_broker: TansuBroker, make_env: MakeEnv, unique_topic: str, registry: CollectorRegistry
) -> None:
    env = await make_env({"main": cluster(kafka_broker.bootstrap)}, {"main": [unique_topic]})
    # The record goes out, but carries another order id than the one the step waits for.
    flow = steps(
        produce(unique_topic),
        consume(unique_topic, within="700ms", match={"json": {"$.sku": "probe-2"}}),
    )
    started = time.monotonic()
    sent, missing = await env.run(flow)
    assert isinstance(sent, StepOutcome)
    assert isinstance(missing, StepFailed)
    assert missing.reason == "not_received"
    assert "$.sku='probe-2'" in missing.message
    assert "1 other arrival(s)" in missing.message
    assert time.monotonic() - started < 3
    assert arrivals(registry, "unmatched") == 1


@pytest.mark.parametrize(
    ("rule", "expect", "message"),
    [
        # the run's record came (its ref) but with another sku: the rule refused it
        ({"json": {"$.ref": "{{ run.correlation }}", "$.sku": "probe-2"}}, {},
         "carried this run's values but not all the step matches on: $.sku 'probe-1', "
         "want 'probe-2'"),
        # matched, then failed `expect`
        ({"json": {"$.ref": "{{ run.correlation }}"}}, {"json": {"$.sku": "probe-2"}},
         "$.sku is 'probe-1', want 'probe-2'"),
    ],
    ids=["rule", "expect"],
)  # fmt: skip
async def test_this_runs_record_gone_wrong_is_an_assertion(
    kafka_broker: TansuBroker,
    make_env: MakeEnv,
    unique_topic: str,
    rule: dict[str, Any],
    expect: dict[str, Any],
    message: str,
) -> None:
    env = await make_env({"main": cluster(kafka_broker.bootstrap)}, {"main": [unique_topic]})
    flow = steps(
        produce(unique_topic),
        consume(unique_topic, within="700ms", match=rule, expect=expect),
    )
    sent, wrong = await env.run(flow)
    assert isinstance(sent, StepOutcome)
    assert isinstance(wrong, StepFailed)
    assert wrong.reason == "assertion"
    assert message in wrong.message
    assert wrong.excerpt is not None and "probe-1" in wrong.excerpt


async def test_duplicate(
    kafka_broker: TansuBroker, make_env: MakeEnv, unique_topic: str, registry: CollectorRegistry
) -> None:
    env = await make_env({"main": cluster(kafka_broker.bootstrap)}, {"main": [unique_topic]})
    # The service under watch emits the event twice: two records, same correlation header.
    flow = steps(
        produce(unique_topic),
        produce(unique_topic, name="send_again"),
        consume(unique_topic, duplicate_window="3s", latency_from="step:send"),
    )
    *_, seen = await env.run(flow)
    assert isinstance(seen, StepFailed)
    assert seen.reason == "duplicate"
    assert seen.latency_s is not None
    assert arrivals(registry, "duplicate") == 1


async def test_out_of_order(
    kafka_broker: TansuBroker, make_env: MakeEnv, unique_topic: str, registry: CollectorRegistry
) -> None:
    env = await make_env({"main": cluster(kafka_broker.bootstrap)}, {"main": [unique_topic]})
    flow = steps(
        consume(
            unique_topic,
            match={"key": "order-7", "json": {"$.state": "shipped"}},
            within="5s",
        )
    )
    # A service that publishes "shipped" (seq 1) after "packed" (seq 2) for the same key.
    service = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await service.start()
    try:

        async def emit() -> None:
            for state, seq in (("packed", 2), ("shipped", 1)):
                await service.send_and_wait(
                    unique_topic,
                    json.dumps({"state": state}).encode(),
                    key=b"order-7",
                    headers=[(SEQ_HEADER, str(seq).encode())],
                )

        run = asyncio.create_task(env.run(flow))
        await asyncio.sleep(0)  # let the run register its expectation first, as a trigger would
        await emit()
        (seen,) = await run
    finally:
        await service.stop()
    assert isinstance(seen, StepFailed)
    assert seen.reason == "out_of_order"
    assert "seq 1 for key 'order-7' came after seq 2" in seen.message
    assert arrivals(registry, "out_of_order") == 1


async def test_broker_outage_breaks_only_its_links_and_heals(
    kafka_broker: TansuBroker,
    own_kafka_broker: TansuBroker,
    make_env: MakeEnv,
    unique_topic: str,
) -> None:
    env = await make_env(
        {
            "main": cluster(kafka_broker.bootstrap),
            "flaky": cluster(own_kafka_broker.bootstrap, health_interval="300ms"),
        },
        {"main": [unique_topic], "flaky": [unique_topic]},
    )
    on_flaky = steps(produce(unique_topic, cluster="flaky"), consume(unique_topic, cluster="flaky"))
    on_main = steps(produce(unique_topic), consume(unique_topic))
    assert all(isinstance(r, StepOutcome) for r in await env.run(on_flaky))

    await own_kafka_broker.kill()
    started = time.monotonic()
    (failed,) = await env.run(on_flaky, run_timeout=8)
    assert isinstance(failed, StepFailed)
    assert failed.reason in ("connect_error", "timeout"), failed.message
    assert time.monotonic() - started < 6
    # The failed producer was dropped: the next send fails at once, on connecting.
    started = time.monotonic()
    (failed,) = await env.run(on_flaky, run_timeout=8)
    assert isinstance(failed, StepFailed) and failed.reason == "connect_error", failed.message
    assert time.monotonic() - started < 2
    # Links on the other cluster keep passing meanwhile.
    assert all(isinstance(r, StepOutcome) for r in await env.run(on_main))
    async with asyncio.timeout(10):
        await env.clients.wait_consumer("flaky", "down")
    assert env.clients.health()["flaky"].last_error
    # Watching alone, with the consumer cut off, is a connection problem, not a lost record.
    (watch,) = await env.run(steps(consume(unique_topic, cluster="flaky", within="300ms")))
    assert isinstance(watch, StepFailed) and watch.reason == "connect_error", watch.message

    await own_kafka_broker.start()  # same port, fresh (empty) storage
    async with asyncio.timeout(15):
        await env.clients.wait_consumer("flaky", "up")
    results = await env.run(on_flaky)
    assert all(isinstance(r, StepOutcome) for r in results), results
    health = env.clients.health()["flaky"]
    assert health.producer == "up" and health.consumer == "up"
    assert health.log_resets >= 1  # the restarted broker's log began again at offset 0


async def test_consumer_started_while_broker_down(
    own_kafka_broker: TansuBroker, make_env: MakeEnv, unique_topic: str
) -> None:
    await own_kafka_broker.stop()
    clients = KafkaClients(
        {"main": cluster(own_kafka_broker.bootstrap)}, topics={"main": [unique_topic]}
    )
    await clients.start()  # does not raise: the monitor starts without its broker
    try:
        async with asyncio.timeout(10):
            await clients.wait_consumer("main", "down")
        await own_kafka_broker.start()
        async with asyncio.timeout(15):
            await clients.wait_consumer("main", "up")
    finally:
        async with asyncio.timeout(15):
            await clients.close()
    assert clients.health()["main"].consumer == "off"


async def test_broker_restarts_on_its_port(own_kafka_broker: TansuBroker) -> None:
    port = own_kafka_broker.port
    assert own_kafka_broker.running
    await own_kafka_broker.restart()
    assert own_kafka_broker.running and own_kafka_broker.port == port
    assert await own_kafka_broker._answers_metadata(2.0)
    await own_kafka_broker.stop()
    assert not own_kafka_broker.running
    assert not await own_kafka_broker._answers_metadata(1.0)


async def test_batched_records_are_not_a_log_reset(
    kafka_broker: TansuBroker,
    unique_topic: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tansu answers ListOffsets with the last batch's base offset + 1, so after a batch of three
    the "end" is two below the consumer's position. That is not a log that went backwards: no
    re-read, no warning (it printed `log end 97 < position 99, re-reading` after `gate`)."""
    from monitor.kafka.consumer import SharedConsumer

    checked: list[int] = []
    enough = asyncio.Event()
    real_check = SharedConsumer._check

    async def counted(self: SharedConsumer, consumer: Any) -> None:
        await real_check(self, consumer)
        checked.append(1)
        if len(checked) >= 3:
            enough.set()

    monkeypatch.setattr(SharedConsumer, "_check", counted)
    got: list[Any] = []
    all_in = asyncio.Event()

    def offered(arrival: Any) -> None:
        got.append(arrival)
        if len(got) == 9:
            all_in.set()

    clients = KafkaClients(
        {"main": cluster(kafka_broker.bootstrap, health_interval="100ms")},
        topics={"main": [unique_topic]},
        on_arrival=offered,
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, linger_ms=50)
    await clients.start()
    await producer.start()
    try:
        async with asyncio.timeout(15):
            await clients.wait_consumer("main", "up")
            for batch in range(3):  # three records in one batch, three times
                sent = [
                    await producer.send(unique_topic, b'{"n": %d}' % i, partition=0)
                    for i in range(3 * batch, 3 * batch + 3)
                ]
                await asyncio.gather(*sent)
            await all_in.wait()
            checked.clear()
            enough.clear()
            await enough.wait()  # three health checks after every record was read
    finally:
        await producer.stop()
        async with asyncio.timeout(15):
            await clients.close()
    assert [a.json["n"] for a in got] == list(range(9))  # each once, none re-read
    assert clients.health()["main"].log_resets == 0
    assert "re-reading" not in caplog.text


async def test_a_topic_recreated_with_more_partitions_is_read_on_all_of_them(
    own_kafka_broker: TansuBroker, unique_topic: str
) -> None:
    """A broker back with empty storage lets the first producer re-create a watched topic with
    the broker's default partitions (Tansu: 4, where it had 3). Records on the new partition
    went unread until the consumer's metadata aged (30 s): the soak's `order_event`
    not_received for a quarter of the runs after the broker fault."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=own_kafka_broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(unique_topic, 3, 1)])
    finally:
        await admin.close()
    got: dict[int, asyncio.Event] = {p: asyncio.Event() for p in range(4)}

    def offered(arrival: Any) -> None:
        got[arrival.meta["partition"]].set()

    clients = KafkaClients(
        {"main": cluster(own_kafka_broker.bootstrap, health_interval="200ms")},
        topics={"main": [unique_topic]},
        on_arrival=offered,
    )
    await clients.start()
    try:
        async with asyncio.timeout(15):
            await clients.wait_consumer("main", "up")
        await own_kafka_broker.kill()
        await own_kafka_broker.start()  # empty: the topic is gone
        producer = AIOKafkaProducer(bootstrap_servers=own_kafka_broker.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(unique_topic, b'{"n": 1}', partition=0)  # auto-created
            partitions = producer._metadata.partitions_for_topic(unique_topic)
            assert partitions is not None and 3 in partitions  # the broker's default
            await producer.send_and_wait(unique_topic, b'{"n": 3}', partition=3)
        finally:
            await producer.stop()
        async with asyncio.timeout(10):  # the metadata's age, not the 30 s it was
            await got[3].wait()
    finally:
        async with asyncio.timeout(15):
            await clients.close()
