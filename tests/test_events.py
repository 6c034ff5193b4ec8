"""Events out against a real Tansu broker: valid CloudEvents from real runs, incidents opened,
closed and reopened, keys and order per link, no secrets, and a broker outage that only drops."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import CollectorRegistry

from monitor.cluster.settings import default_replica
from monitor.config import Config, Settings
from monitor.demo.broker import TansuBroker, free_port
from monitor.engine import Engine, Options
from monitor.events.settings import EventsSettings
from monitor.results import RunResult

pytestmark = pytest.mark.kafka

SECRET = "tok-events-very-secret"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
INCIDENT = "dev.hopwatch.incident."


# -- the system under watch: a link that fails or passes on demand -------------------------


@dataclass
class Target:
    server: TestServer
    healthy: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    """`/ok` always passes; `/check` passes only while healthy, else echoes the bearer token
    (so the failure message would carry the secret if the runner did not mask it)."""
    state = Target(server=None)  # type: ignore[arg-type]

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"token": "ok"})

    async def check(request: web.Request) -> web.Response:
        token = "ok" if state.healthy else request.headers.get("Authorization", "")
        return web.json_response({"token": token})

    app = web.Application()
    app.add_routes([web.get("/ok", ok), web.get("/check", check)])
    state.server = TestServer(app, host="127.0.0.1")
    await state.server.start_server()
    yield state
    await state.server.close()


def flows_yaml(bootstrap: str, topic: str, target: Target, buffer: int = 10_000) -> str:
    return f"""\
settings:
  events: {{cluster: main, topic: {topic}, buffer: {buffer}}}
kafka:
  clusters:
    main: {{bootstrap_servers: "{bootstrap}", request_timeout: 1s}}
flows:
  - name: pay
    interval: 150ms
    timeout: 2s
    variants: {{default: {{base_url: "{target.url}"}}}}
    steps:
      - {{name: a, kind: http, url: "{{{{ variant.base_url }}}}/ok"}}
      - name: b
        kind: http
        url: "{{{{ variant.base_url }}}}/check"
        auth: {{bearer: "${{env:HW_EVENTS_TOKEN}}"}}
        expect: {{json: {{"$.token": "ok"}}}}
  - name: ship
    interval: 150ms
    timeout: 2s
    variants: {{default: {{base_url: "{target.url}"}}}}
    steps:
      - {{name: a, kind: http, url: "{{{{ variant.base_url }}}}/ok"}}
"""


# -- reading the topic ----------------------------------------------------------------------


@dataclass
class Record:
    key: str
    partition: int
    headers: dict[str, bytes]
    raw: bytes
    event: dict[str, Any]


@dataclass
class Reader:
    """Everything on the events topic, in the order each partition holds it."""

    consumer: AIOKafkaConsumer
    records: list[Record] = field(default_factory=list)

    async def until(self, done: Callable[[list[Record]], bool], within: float, what: str) -> None:
        try:
            async with asyncio.timeout(within):
                while not done(self.records):
                    batches = await self.consumer.getmany(timeout_ms=100)
                    for part, records in sorted(batches.items(), key=lambda kv: kv[0].partition):
                        for r in records:
                            self.records.append(
                                Record(
                                    key=(r.key or b"").decode(),
                                    partition=part.partition,
                                    headers=dict(r.headers),
                                    raw=r.value or b"",
                                    event=json.loads(r.value or b"{}"),
                                )
                            )
        except TimeoutError:
            seen = [(r.event.get("type"), r.key) for r in self.records][-20:]
            pytest.fail(f"not within {within}s: {what}; last seen: {seen}")

    def of(self, type_prefix: str, key: str | None = None) -> list[Record]:
        return [
            r
            for r in self.records
            if r.event["type"].startswith(type_prefix) and (key is None or r.key == key)
        ]


@pytest.fixture
async def make_reader() -> AsyncIterator[Callable[[str, str], Any]]:
    consumers: list[AIOKafkaConsumer] = []

    async def make(bootstrap: str, topic: str) -> Reader:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
            enable_auto_commit=False, metadata_max_age_ms=500,
        )  # fmt: skip
        await consumer.start()
        consumers.append(consumer)
        return Reader(consumer)

    yield make
    for consumer in consumers:
        await consumer.stop()


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await asyncio.wait_for(admin.create_topics([NewTopic(topic, partitions, 1)]), 10)
    finally:
        await admin.close()


def engine_for(config: Config, registry: CollectorRegistry, **options: Any) -> Engine:
    listen = f"127.0.0.1:{free_port()}"
    return Engine(config, Options(listen=listen, grace=2.0, **options), registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@dataclass
class Setup:
    """One test's broker, topic, target and registry, and the monitor built on them."""

    broker: TansuBroker
    topic: str
    target: Target
    registry: CollectorRegistry
    load_flows: Callable[[str], Config]
    make_reader: Callable[[str, str], Any]

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    def config(self, buffer: int = 10_000, interval: str = "150ms") -> Config:
        text = flows_yaml(self.bootstrap, self.topic, self.target, buffer)
        return self.load_flows(text.replace("interval: 150ms", f"interval: {interval}"))

    def engine(self, config: Config | None = None, **options: Any) -> Engine:
        return engine_for(config or self.config(), self.registry, **options)

    async def reader(self) -> Reader:
        reader: Reader = await self.make_reader(self.bootstrap, self.topic)
        return reader

    def value(self, name: str, **labels: str) -> float:
        return value(self.registry, name, **labels)


def setup_on(broker: TansuBroker, request: pytest.FixtureRequest) -> Setup:
    request.getfixturevalue("monkeypatch").setenv("HW_EVENTS_TOKEN", SECRET)
    return Setup(
        broker, *(request.getfixturevalue(name) for name in (
            "unique_topic", "target", "registry", "load_flows", "make_reader"))
    )  # fmt: skip


@pytest.fixture
def events(kafka_broker: TansuBroker, request: pytest.FixtureRequest) -> Setup:
    return setup_on(kafka_broker, request)


@pytest.fixture
def own_events(own_kafka_broker: TansuBroker, request: pytest.FixtureRequest) -> Setup:
    return setup_on(own_kafka_broker, request)


def assert_cloudevent(record: Record) -> None:
    """Structured mode, CloudEvents 1.0: required and the optional attributes hopwatch sets."""
    event = record.event
    assert record.headers["content-type"] == b"application/cloudevents+json"
    assert event["specversion"] == "1.0"
    assert isinstance(event["id"], str) and event["id"]
    assert event["source"] == f"hopwatch/{default_replica()}"
    assert re.fullmatch(r"dev\.hopwatch\.(run\.finished|incident\.(opened|closed|reopened))",
                        event["type"])  # fmt: skip
    assert event["datacontenttype"] == "application/json"
    assert RFC3339.match(event["time"]), event["time"]
    assert record.key == event["subject"]  # the key is the subject: the link, or flow/variant
    assert set(event) <= {"specversion", "id", "source", "type", "subject", "time",
                          "datacontenttype", "data"}  # fmt: skip


# -- the tests --------------------------------------------------------------------------------


async def test_incidents_open_close_and_reopen_as_cloudevents(events: Setup) -> None:
    await create_topic(events.bootstrap, events.topic, 4)  # several partitions: keys keep order
    reader = await events.reader()
    link = "pay/default/local/b"
    target = events.target
    async with events.engine() as engine:
        await engine.start(admin=False)
        await reader.until(lambda _: reader.of(INCIDENT + "opened", link) != [], 20, "opened")
        target.healthy = True
        await reader.until(lambda _: reader.of(INCIDENT + "closed", link) != [], 20, "closed")
        target.healthy = False
        await reader.until(lambda _: reader.of(INCIDENT + "reopened", link) != [], 20, "again")
        target.healthy = True
        await reader.until(lambda _: len(reader.of(INCIDENT, link)) == 4, 20, "closed again")
    # what the monitor published is all on the topic (the sink flushes at stop)
    published = sum(
        events.value("hopwatch_events_published_total", type=t)
        for t in ("dev.hopwatch.run.finished", *(INCIDENT + x for x in ("opened", "closed",
                                                                        "reopened")))
    )  # fmt: skip
    await reader.until(lambda records: len(records) >= published, 10, "every published event")
    assert len(reader.records) == published

    for record in reader.records:
        assert_cloudevent(record)
        assert SECRET.encode() not in record.raw
    ids = [(r.event["source"], r.event["id"]) for r in reader.records]
    assert len(set(ids)) == len(ids)  # unique per source

    # one link, one partition, in the order decided: opened, closed, reopened, closed
    incidents = reader.of(INCIDENT, link)
    assert [r.event["type"].removeprefix(INCIDENT) for r in incidents] == [
        "opened", "closed", "reopened", "closed"
    ]  # fmt: skip
    assert len({r.partition for r in incidents}) == 1
    data = [r.event["data"] for r in incidents]
    assert len({d["id"] for d in data}) == 1  # a flap reopens the same incident
    assert [d["status"] for d in data] == ["open", "closed", "open", "closed"]
    assert [d["flaps"] for d in data] == [0, 0, 1, 1]
    assert data[0]["reason"] == "assertion" and data[0]["step"] == "b"
    assert data[1]["closing_run_id"] and data[1]["closed_at"] >= data[0]["opened_at"]
    assert reader.of(INCIDENT, "pay/default/local/a") == []  # the healthy hop opened nothing
    assert events.value("hopwatch_events_published_total", type=INCIDENT + "opened") == 1

    # runs: keyed flow/variant, each key on one partition, times never going back
    for key in ("pay/default", "ship/default"):
        runs = reader.of("dev.hopwatch.run.finished", key)
        assert len(runs) >= 3
        assert len({r.partition for r in runs}) == 1
        times = [r.event["time"] for r in runs]
        assert times == sorted(times)
    failed = next(
        r.event["data"] for r in reader.of("dev.hopwatch.run.finished", "pay/default")
        if r.event["data"]["outcome"] == "failure"
    )  # fmt: skip
    assert failed["broken_step"] == "b" and failed["reason"] == "assertion"
    assert "***" in failed["message"]  # the echoed token, masked by the runner
    assert failed["replica"] is None and failed["duration_s"] > 0
    assert set(failed) >= {"run_id", "trace_id", "started_at", "location", "correlation"}
    assert events.value("hopwatch_events_dropped_total", reason="buffer_full") == 0


async def test_with_a_store_events_carry_the_stores_incidents(
    events: Setup, sqlite_url: str
) -> None:
    """One decision, one event: the events sink observes the store's book, so the incident
    in the event is the one `/api/v1/incidents` shows."""
    reader = await events.reader()
    link = "pay/default/local/b"
    async with events.engine(store_url=sqlite_url) as engine:
        await engine.start(admin=False)
        await reader.until(lambda _: reader.of(INCIDENT + "opened", link) != [], 20, "opened")
        assert engine.store is not None
        stored = engine.store.open_incidents()
        assert [i.id for i in stored] == [reader.of(INCIDENT, link)[0].event["data"]["id"]]
        events.target.healthy = True
        await reader.until(lambda _: reader.of(INCIDENT + "closed", link) != [], 20, "closed")
    assert [r.event["type"] for r in reader.of(INCIDENT)] == [
        INCIDENT + "opened", INCIDENT + "closed"
    ]  # fmt: skip
    assert sum(1 for s in engine.sinks.sinks if type(s).__name__ == "EventsSink") == 1


async def test_the_stores_last_decisions_go_out_at_stop(events: Setup, sqlite_url: str) -> None:
    """The store decides a run it had not written yet while it closes: the events sink closes
    after it, so that decision is published, not dropped."""
    config = events.config(interval="1h")
    async with events.engine(config, store_url=sqlite_url) as engine:
        await engine.start(admin=False)
        await engine.runner.run(config.flow("pay"), "default")  # the store lingers on it
    reader = await events.reader()
    await reader.until(lambda _: reader.of(INCIDENT + "opened") != [], 10, "the incident")
    assert events.value("hopwatch_events_dropped_total", reason="shutdown") == 0


@dataclass
class CountRuns:
    """Counts finished runs, to show probing goes on while the broker is away."""

    runs: int = 0
    durations: list[float] = field(default_factory=list)

    def submit(self, result: RunResult) -> None:
        self.runs += 1
        self.durations.append(result.duration_s)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def wait_for(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


async def test_broker_outage_drops_and_counts_never_blocks_probing_and_recovers(
    own_events: Setup,
) -> None:
    events, broker = own_events, own_events.broker
    events.target.healthy = True
    counter = CountRuns()
    finished = "dev.hopwatch.run.finished"

    def published() -> float:
        return events.value("hopwatch_events_published_total", type=finished)

    def dropped() -> float:
        return events.value("hopwatch_events_dropped_total", reason="buffer_full")

    async with events.engine(events.config(buffer=5), extra_sinks=[counter]) as engine:
        await engine.start(admin=False)
        await wait_for(lambda: published() >= 4, 20, "events published")
        await broker.kill()
        runs_at_outage = counter.runs
        outage = time.monotonic()
        await wait_for(lambda: dropped() >= 10, 30, "events dropped while the broker is away")
        # probing went on at its pace: two flows every 150 ms, none slowed by the broker
        during = counter.runs - runs_at_outage
        assert during >= (time.monotonic() - outage) / 0.15, (during, time.monotonic() - outage)
        assert max(counter.durations[runs_at_outage:]) < 1.0
        assert events.value("hopwatch_events_buffered") <= 5
        assert events.value("hopwatch_sink_errors_total", sink="events") == 0

        await broker.start()  # same port, empty: the topic comes back on first use
        before = published()
        await wait_for(lambda: published() >= before + 4, 30, "publishing again")
        reader = await events.reader()
        await reader.until(lambda r: len(r) >= 4, 20, "events after the outage on the topic")
    for record in reader.records:
        assert_cloudevent(record)
    assert counter.runs > runs_at_outage


async def test_check_publishes_nothing(
    load_flows: Callable[[str], Config], registry: CollectorRegistry, target: Target
) -> None:
    """`hopwatch check` (no scheduler) is a one-off look: it adds no events sink."""
    engine = engine_for(load_flows(flows_yaml("127.0.0.1:9", "t", target)), registry)
    async with engine:
        await engine.start(schedule=False, admin=False)
        assert all(type(s).__name__ != "EventsSink" for s in engine.sinks.sinks)


@pytest.mark.parametrize("model", [EventsSettings, Settings])
def test_every_field_states_its_default(model: type[Any]) -> None:
    for name, info in model.model_fields.items():
        text = (info.description or "").lower()
        assert "default" in text or "required" in text, name


def test_source_names_the_replica_and_the_cluster_must_be_known(
    registry: CollectorRegistry,
) -> None:
    from monitor.events.sink import events_sink
    from monitor.kafka.settings import KafkaCluster
    from probes.errors import ConfigError

    settings = EventsSettings(cluster="main")
    clusters = {"main": KafkaCluster(bootstrap_servers="127.0.0.1:9")}
    sink = events_sink(settings, clusters, replica="eu 1/a", registry=registry, book=None)
    assert sink.source == "hopwatch/eu%201%2Fa"  # a URI-reference, whatever the name
    assert sink.topic == "hopwatch.events"
    with pytest.raises(ConfigError) as caught:
        events_sink(settings, {}, replica=None, registry=CollectorRegistry(), book=None)
    assert caught.value.problems == [
        "settings.events.cluster: 'main' is not in kafka.clusters (known: none)"
    ]
