"""Kafka for the engine: cluster settings, producers, and one shared consumer per cluster.

The engine owns one `KafkaClients`. It lends producers to `kafka_produce` steps (one per
cluster and acks setting, made on first use and replaced after a failure) and runs one
consumer per cluster over every topic a `kafka_consume` step watches. That consumer starts
with the monitor, reads from the end of each topic, belongs to no consumer group, and hands
every record to a callback (the correlator's `offer`) as an `Arrival`. A broker that is down
only fails the steps that need it; both sides reconnect on their own, without a restart.

aiokafka's exceptions are translated to step failures in exactly one place: `translate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
)
from aiokafka.helpers import create_ssl_context
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from monitor.correlator import Arrival
from probes.durations import Duration
from probes.errors import (
    ConfigError,
    ConnectError,
    DnsError,
    OtherFailure,
    StepFailed,
    Timeout,
    TlsError,
    drop_frames,
)
from probes.secrets import SecretUnavailable, resolve_secret

if TYPE_CHECKING:
    from prometheus_client import Counter

__all__ = [
    "SEQ_HEADER",
    "Acks",
    "ClusterHealth",
    "KafkaClients",
    "KafkaCluster",
    "Produced",
    "channel_name",
    "translate",
]

log = logging.getLogger(__name__)

SEQ_HEADER = "hopwatch-seq"  # per-key sequence stamped on every produced record
Acks = Literal["all", 0, 1]

_POLL_MS = 500  # longest a getmany waits when the topics are quiet
_MAX_RECORDS = 500
_BACKOFF_MIN_S = 0.2
_BACKOFF_MAX_S = 5.0
_CLOSE_BUDGET_S = 5.0
_METADATA_MAX_AGE_MS = 30_000  # how soon partitions added to a watched topic are seen
_REPLAY_LIMIT = 1000  # records re-read from a log that went backwards (a broker that lost it)
_SEQ_MEMORY = 10_000  # keys remembered for sequence stamping and order checks


class KafkaCluster(BaseModel):
    """How to reach one Kafka cluster; secrets may be `${env:NAME}` or `${file:/path}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str | list[str] = Field(
        description='"host:port", comma-separated or a list; required, no default.'
    )
    client_id: str = Field(default="hopwatch", description="Kafka client id; default hopwatch.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="Transport and authentication; default PLAINTEXT."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="SASL mechanism, required with SASL_*; default none."
    )
    sasl_username: str | None = Field(
        default=None, description="SASL user (may be a ${env:…} reference); default none."
    )
    sasl_password: SecretStr | None = Field(
        default=None, description="SASL password, best as ${env:…} or ${file:…}; default none."
    )
    ssl_cafile: str | None = Field(
        default=None, description="CA bundle to verify brokers; default the system's."
    )
    ssl_certfile: str | None = Field(
        default=None, description="Client certificate (mutual TLS); default none."
    )
    ssl_keyfile: str | None = Field(
        default=None, description="Client private key (mutual TLS); default none."
    )
    ssl_password: SecretStr | None = Field(
        default=None, description="Password of the client key; default none."
    )
    ssl_check_hostname: bool = Field(
        default=True, description="Check the broker's certificate name; default true."
    )
    request_timeout: Duration = Field(
        default=10.0, description="Limit for one request, and for a send to be acked; default 10s."
    )
    fetch_max_wait: Duration = Field(
        default=0.1,
        description="Longest the broker holds a fetch open; bounds observe latency; default 100ms.",
    )
    health_interval: Duration = Field(
        default=2.0,
        description="How often the shared consumer checks the broker and its offsets; default 2s.",
    )

    @field_validator("request_timeout", "fetch_max_wait", "health_interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @model_validator(mode="after")
    def _consistent_security(self) -> KafkaCluster:
        sasl = self.security_protocol.startswith("SASL_")
        given_sasl = [
            n for n in ("sasl_mechanism", "sasl_username", "sasl_password") if getattr(self, n)
        ]
        if sasl and len(given_sasl) < 3:
            raise ValueError(
                f"{self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password"
            )
        if not sasl and given_sasl:
            raise ValueError(f"{', '.join(given_sasl)} need security_protocol SASL_*")
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        given_ssl = [
            n
            for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password")
            if getattr(self, n) is not None
        ]
        if not tls and given_ssl:
            raise ValueError(f"{', '.join(given_ssl)} need security_protocol SSL or SASL_SSL")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("give ssl_certfile and ssl_keyfile together")
        return self

    @property
    def servers(self) -> list[str]:
        raw = self.bootstrap_servers
        parts = raw.split(",") if isinstance(raw, str) else raw
        return [p.strip() for p in parts if p.strip()]


def channel_name(cluster: str, topic: str) -> str:
    """The correlator channel of a topic: `<cluster>/<topic>`."""
    return f"{cluster}/{topic}"


def describe(exc: BaseException) -> str:
    """`Name: message`, once: aiokafka's own messages already start with the class name."""
    name, text = type(exc).__name__, str(exc)
    if text.startswith(name):
        return text
    return f"{name}: {text}" if text else name


def translate(exc: BaseException, what: str) -> StepFailed:
    """The one place aiokafka's (and the socket's) exceptions become step failures."""
    drop_frames(exc)
    detail = f"{what}: {describe(exc)}"
    if isinstance(exc, KafkaTimeoutError | RequestTimedOutError | TimeoutError):
        return Timeout(detail)
    if isinstance(exc, ssl.SSLError):
        return TlsError(detail)
    if isinstance(exc, socket.gaierror):
        return DnsError(detail)
    if isinstance(exc, KafkaConnectionError | NodeNotReadyError | OSError):
        return ConnectError(detail)
    return OtherFailure(detail)


def _client_options(
    name: str, cluster: KafkaCluster, ssl_context: ssl.SSLContext | None
) -> dict[str, Any]:
    """aiokafka keyword arguments shared by producers and consumers, secrets resolved."""
    options: dict[str, Any] = {
        "bootstrap_servers": cluster.servers,
        "client_id": cluster.client_id,
        "security_protocol": cluster.security_protocol,
        "request_timeout_ms": int(cluster.request_timeout * 1000),
        "ssl_context": ssl_context,
    }
    if cluster.sasl_mechanism is not None:
        try:
            options["sasl_mechanism"] = cluster.sasl_mechanism
            options["sasl_plain_username"] = resolve_secret(cluster.sasl_username or "")
            options["sasl_plain_password"] = resolve_secret(cluster.sasl_password or "")
        except SecretUnavailable as exc:
            raise ConfigError([f"kafka cluster {name!r}: {exc}"]) from exc
    return options


def _ssl_context(name: str, cluster: KafkaCluster) -> ssl.SSLContext | None:
    if cluster.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    try:
        password = resolve_secret(cluster.ssl_password) if cluster.ssl_password else None
        context: ssl.SSLContext = create_ssl_context(
            cafile=cluster.ssl_cafile,
            certfile=cluster.ssl_certfile,
            keyfile=cluster.ssl_keyfile,
            password=password,
        )
    except (SecretUnavailable, OSError) as exc:
        raise ConfigError([f"kafka cluster {name!r} TLS settings: {exc}"]) from exc
    context.check_hostname = cluster.ssl_check_hostname
    return context


@dataclass(slots=True)
class Produced:
    """A record the broker acknowledged."""

    topic: str
    partition: int
    offset: int
    seq: int
    sent_at: float  # monotonic, just before the send
    latency_s: float  # send → ack
    connect_s: float | None = None  # producer set-up, when this send had to make one


@dataclass(slots=True)
class ClusterHealth:
    """What the monitor knows about one cluster right now."""

    cluster: str
    topics: tuple[str, ...]
    consumer: Literal["off", "starting", "up", "down"] = "off"
    producer: Literal["idle", "up", "down"] = "idle"
    last_error: str | None = None
    last_error_unix: float | None = None
    last_record_unix: float | None = None
    consumer_restarts: int = 0
    log_resets: int = 0  # partitions whose log went backwards (a broker that lost its data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "topics": list(self.topics),
            "consumer": self.consumer,
            "producer": self.producer,
            "last_error": self.last_error,
            "last_error_unix": self.last_error_unix,
            "last_record_unix": self.last_record_unix,
            "consumer_restarts": self.consumer_restarts,
            "log_resets": self.log_resets,
        }


class _Lru(OrderedDict[Any, int]):
    """A bounded map of the most recently used keys (sequence numbers by key)."""

    def put(self, key: Any, value: int) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > _SEQ_MEMORY:
            self.popitem(last=False)


@dataclass
class _Cluster:
    name: str
    config: KafkaCluster
    health: ClusterHealth
    topics: set[str] = field(default_factory=set)
    ssl_context: ssl.SSLContext | None = None
    producers: dict[Acks, AIOKafkaProducer] = field(default_factory=dict)
    producer_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    consumer_task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def set_consumer(self, state: Literal["off", "starting", "up", "down"]) -> None:
        if self.health.consumer != state:
            self.health.consumer = state
            self.changed.set()
            self.changed = asyncio.Event()

    def failed(self, exc: BaseException) -> None:
        self.health.last_error = describe(exc)
        self.health.last_error_unix = time.time()


class KafkaClients:
    """Producers and shared consumers for every configured cluster; owned by the engine."""

    def __init__(
        self,
        clusters: Mapping[str, KafkaCluster],
        *,
        on_arrival: Callable[[Arrival], object] | None = None,
        topics: Mapping[str, Iterable[str]] | None = None,
        arrivals_counter: Counter | None = None,
    ) -> None:
        self._clusters = {
            name: _Cluster(name, config, ClusterHealth(name, ()))
            for name, config in clusters.items()
        }
        self.on_arrival = on_arrival
        self._counter = arrivals_counter
        self._seq_out = _Lru()  # (cluster, topic, key) → last sequence stamped
        self._seq_in = _Lru()  # (channel, key) → highest sequence seen
        self._background: set[asyncio.Task[None]] = set()
        self._started = False
        for cluster, names in (topics or {}).items():
            for topic in names:
                self.watch(cluster, topic)

    # -- set-up ------------------------------------------------------------------------------

    def _cluster(self, name: str) -> _Cluster:
        try:
            return self._clusters[name]
        except KeyError:
            known = ", ".join(sorted(self._clusters)) or "none"
            raise ConfigError(
                [f"kafka cluster {name!r} is not configured (known: {known})"]
            ) from None

    def watch(self, cluster: str, topic: str) -> None:
        """Add a topic to the cluster's shared consumer; only before `start()`."""
        state = self._cluster(cluster)
        if topic in state.topics:
            return
        if self._started:
            raise RuntimeError(f"watch({cluster!r}, {topic!r}) after start(): topics are fixed")
        state.topics.add(topic)
        state.health.topics = tuple(sorted(state.topics))

    def watch_steps(self, steps: Iterable[Any]) -> None:
        """Watch the topic of every `kafka_consume` step in `steps` (flow step configs)."""
        for step in steps:
            if getattr(step, "kind", None) == "kafka_consume":
                self.watch(step.cluster, step.topic)

    def watching(self, cluster: str, topic: str) -> bool:
        state = self._clusters.get(cluster)
        return state is not None and topic in state.topics

    async def start(self) -> None:
        """Start one consumer per cluster with watched topics; never fails for a down broker."""
        if self._started:
            return
        self._started = True
        for state in self._clusters.values():
            if state.ssl_context is None:
                state.ssl_context = _ssl_context(state.name, state.config)
            if state.topics:
                state.set_consumer("starting")
                state.consumer_task = asyncio.create_task(
                    self._consume_forever(state), name=f"kafka-consumer-{state.name}"
                )

    async def close(self) -> None:
        """Stop consumers and producers; bounded even when brokers are unreachable."""
        tasks = [s.consumer_task for s in self._clusters.values() if s.consumer_task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for state in self._clusters.values():
            state.consumer_task = None
            state.set_consumer("off")
            for acks, producer in list(state.producers.items()):
                del state.producers[acks]
                await _stop_quietly(producer)
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._started = False

    # -- health ------------------------------------------------------------------------------

    def health(self) -> dict[str, ClusterHealth]:
        """Per cluster: consumer and producer state, the last error, the last record seen."""
        return {name: state.health for name, state in self._clusters.items()}

    async def wait_consumer(self, cluster: str | None = None, state: str = "up") -> None:
        """Return once the shared consumer of `cluster` (default: every one) is in `state`;
        callers bound it with `asyncio.timeout` (e.g. the engine before its first run)."""
        names = (
            [cluster] if cluster is not None else [n for n, s in self._clusters.items() if s.topics]
        )
        for name in names:
            entry = self._cluster(name)
            while entry.health.consumer != state:
                await entry.changed.wait()

    # -- producing ---------------------------------------------------------------------------

    def next_seq(self, cluster: str, topic: str, key: bytes | None) -> int:
        """A per-key sequence that grows across runs and replicas: max(last + 1, unix µs)."""
        slot = (cluster, topic, key)
        seq = max(self._seq_out.get(slot, 0) + 1, time.time_ns() // 1000)
        self._seq_out.put(slot, seq)
        return seq

    async def produce(
        self,
        cluster: str,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        acks: Acks = "all",
        partition: int | None = None,
    ) -> Produced:
        """Send one record, stamped with `hopwatch-seq`, and wait for the broker's ack."""
        state = self._cluster(cluster)
        producer, connect_s = await self._producer(state, acks)
        seq = self.next_seq(cluster, topic, key)
        all_headers = [(k, v) for k, v in headers if k != SEQ_HEADER]
        all_headers.append((SEQ_HEADER, str(seq).encode()))
        sent_at = time.monotonic()
        try:
            meta = await producer.send_and_wait(
                topic, value, key=key, partition=partition, headers=all_headers
            )
        except BaseException as exc:  # cancelled by the step timeout too: the producer is suspect
            self._discard(state, acks, producer, exc)
            if isinstance(exc, Exception):
                raise translate(exc, f"produce to {cluster}/{topic}") from exc
            raise
        state.health.producer = "up"
        return Produced(
            topic=meta.topic,
            partition=meta.partition,
            offset=meta.offset,
            seq=seq,
            sent_at=sent_at,
            latency_s=time.monotonic() - sent_at,
            connect_s=connect_s,
        )

    async def _producer(self, state: _Cluster, acks: Acks) -> tuple[AIOKafkaProducer, float | None]:
        """The cluster's producer for `acks`, made now if there is none (first use, or failure)."""
        async with state.producer_lock:
            producer = state.producers.get(acks)
            if producer is not None:
                return producer, None
            if state.ssl_context is None:
                state.ssl_context = _ssl_context(state.name, state.config)
            producer = AIOKafkaProducer(
                **_client_options(state.name, state.config, state.ssl_context), acks=acks
            )
            started = time.monotonic()
            try:
                await producer.start()
            except BaseException as exc:
                state.health.producer = "down"
                state.failed(exc)
                await _stop_quietly(producer)
                if isinstance(exc, Exception):
                    raise translate(exc, f"connect to {state.name}") from exc
                raise
            state.producers[acks] = producer
            return producer, time.monotonic() - started

    def _discard(
        self, state: _Cluster, acks: Acks, producer: AIOKafkaProducer, exc: BaseException
    ) -> None:
        """Drop a producer that failed; the next send makes a fresh one (and fails fast if the
        broker is still gone). The old one is stopped in the background, so in-flight sends of
        other runs finish or fail on their own."""
        state.health.producer = "down"
        state.failed(exc)
        if state.producers.get(acks) is producer:
            del state.producers[acks]
            task = asyncio.create_task(_stop_quietly(producer))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- the shared consumer -----------------------------------------------------------------

    def _new_consumer(self, state: _Cluster) -> AIOKafkaConsumer:
        config = state.config
        return AIOKafkaConsumer(
            *sorted(state.topics),
            **_client_options(state.name, config, state.ssl_context),
            group_id=None,  # see the README: observing, not consuming; every replica sees all
            enable_auto_commit=False,
            # Reading "from the end" is done by an explicit seek at start; partitions that
            # appear later (a topic created after us, a broker that lost its log) are new,
            # so they are read from their beginning.
            auto_offset_reset="earliest",
            fetch_max_wait_ms=int(config.fetch_max_wait * 1000),
            metadata_max_age_ms=_METADATA_MAX_AGE_MS,
        )

    async def _consume_forever(self, state: _Cluster) -> None:
        """Keep one consumer alive for the cluster: make it, read, and remake it after a crash."""
        backoff = _BACKOFF_MIN_S
        while True:
            consumer = self._new_consumer(state)
            try:
                async with asyncio.timeout(state.config.request_timeout * 2):
                    await consumer.start()
                    await _seek_to_end(consumer)
                state.set_consumer("up")
                backoff = _BACKOFF_MIN_S
                await self._pump(state, consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # down broker, auth refused, our bug: retry, never die
                state.failed(exc)
                state.set_consumer("down")
                log.warning("kafka consumer for %s failed: %s", state.name, state.health.last_error)
            finally:
                await _stop_quietly(consumer)
            state.health.consumer_restarts += 1
            await asyncio.sleep(backoff)  # a timer by nature: nothing to await but time
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _pump(self, state: _Cluster, consumer: AIOKafkaConsumer) -> None:
        next_check = time.monotonic() + state.config.health_interval
        while True:
            batches = await consumer.getmany(timeout_ms=_POLL_MS, max_records=_MAX_RECORDS)
            received_at, received_unix = time.monotonic(), time.time()
            for records in batches.values():
                for record in records:
                    self._deliver(state, record, received_at, received_unix)
            if time.monotonic() >= next_check:
                await self._check(state, consumer)
                next_check = time.monotonic() + state.config.health_interval

    async def _check(self, state: _Cluster, consumer: AIOKafkaConsumer) -> None:
        """Ask the broker for each partition's end offset: proves it answers, and catches a log
        that went backwards (a broker that lost its data), which no fetch error reports."""
        try:
            async with asyncio.timeout(state.config.request_timeout):
                partitions = list(consumer.assignment())
                if not partitions:
                    await consumer.topics()  # still prove the broker answers
                # Positions first: the end can only grow after them, so `end < position` then
                # means the log really went backwards, not that records came in between.
                positions = {tp: await consumer.position(tp) for tp in partitions}
                ends = await consumer.end_offsets(partitions) if partitions else {}
                for tp, end in ends.items():
                    position = positions[tp]
                    if end < position:
                        starts = await consumer.beginning_offsets([tp])
                        consumer.seek(tp, max(starts[tp], end - _REPLAY_LIMIT))
                        state.health.log_resets += 1
                        log.warning(
                            "%s %s: log end %d < position %d, re-reading",
                            state.name,
                            tp,
                            end,
                            position,
                        )
        except (KafkaError, TimeoutError, OSError) as exc:
            state.failed(exc)
            state.set_consumer("down")
            return
        state.set_consumer("up")

    def _deliver(
        self, state: _Cluster, record: Any, received_at: float, received_unix: float
    ) -> None:
        """Turn a record into an Arrival, note its order, and hand it to the callback."""
        headers: dict[str, str] = {}
        for name, raw in record.headers or ():
            headers.setdefault(name, raw.decode("utf-8", "replace") if raw is not None else "")
        body: bytes = record.value or b""
        try:
            doc = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            doc = None
        channel = channel_name(state.name, record.topic)
        meta: dict[str, Any] = {
            "cluster": state.name,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "timestamp_unix": record.timestamp / 1000 if (record.timestamp or -1) >= 0 else None,
        }
        self._note_order(channel, record.key, headers.get(SEQ_HEADER), meta)
        arrival = Arrival(
            source="kafka",
            channel=channel,
            received_at=received_at,
            received_unix=received_unix,
            headers=headers,
            body=body,
            json=doc,
            # The timestamp tells a record apart from another that took its offset in a log
            # that was lost and rebuilt; a redelivery of the same record keeps both.
            delivery_id=f"{record.topic}/{record.partition}/{record.offset}@{record.timestamp}",
            key=record.key,
            meta=meta,
        )
        state.health.last_record_unix = received_unix
        if self.on_arrival is None:
            return
        try:
            self.on_arrival(arrival)
        except Exception:  # the callback's bug must not stop the shared consumer
            log.exception("arrival callback failed for %s", arrival.delivery_id)

    def _note_order(
        self, channel: str, key: bytes | None, raw_seq: str | None, meta: dict[str, Any]
    ) -> None:
        """Kafka keeps order per key; a sequence lower than one already seen breaks it."""
        if raw_seq is None:
            return
        try:
            seq = int(raw_seq)
        except ValueError:
            return
        meta["seq"] = seq
        if key is None:  # records without a key have no order to keep
            return
        slot = (channel, key)
        highest = self._seq_in.get(slot)
        if highest is not None and seq < highest:
            meta["out_of_order_after"] = highest
            if self._counter is not None:
                self._counter.labels(source="kafka", outcome="out_of_order").inc()
            return
        self._seq_in.put(slot, seq)


async def _seek_to_end(consumer: AIOKafkaConsumer) -> None:
    """Position every assigned partition at its end now, so no record produced after this
    returns is missed and none produced before it is replayed."""
    partitions = list(consumer.assignment())
    if partitions:
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)


async def _stop_quietly(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """Stop an aiokafka client within a bounded time, whatever state it is in."""
    try:
        async with asyncio.timeout(_CLOSE_BUDGET_S):
            await client.stop()
    except Exception as exc:
        log.debug("stopping %s: %s", type(client).__name__, exc)
