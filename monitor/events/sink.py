"""The events sink: publishes run results and incident changes to Kafka without ever slowing a run.

`submit` only appends the result to a bounded buffer; one task turns results into CloudEvents
and publishes them with aiokafka. A broker that is away costs the buffer: events wait there
(and go out, in order, when it is back); beyond `buffer` the oldest are dropped and counted in
`hopwatch_events_dropped_total{reason="buffer_full"}`. Delivery is at least once: after an
outage an event may be sent twice, with the same `id`, so consumers can drop the repeat.

Incident decisions come from an `IncidentBook` (monitor/store/incidents.py), observed rather
than copied. With a store, the sink observes the store's own book: events carry the incident
ids of `/api/v1/incidents`, and an incident continues across restarts and cluster handovers,
because the store loads it from the database. Without a store the sink keeps a book of its own
and applies each result to it: events need no database, but a restart starts the book afresh
(a link still failing opens a new incident). Either way one decision makes one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Mapping

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError
from prometheus_client import CollectorRegistry, Counter, Gauge

from monitor.cluster.settings import default_replica
from monitor.events.cloudevents import (
    CONTENT_TYPE,
    EVENT_TYPES,
    Event,
    incident_event,
    run_finished,
    source_of,
)
from monitor.events.settings import EventsSettings
from monitor.kafka.cluster import Cluster, ClusterHealth, stop_quietly
from monitor.kafka.errors import describe
from monitor.kafka.settings import KafkaCluster
from monitor.results import RunResult
from monitor.store.incidents import Incident, IncidentBook, Transition
from probes.errors import ConfigError

__all__ = ["EventsSink", "events_sink"]

log = logging.getLogger(__name__)

HEADERS = [("content-type", CONTENT_TYPE.encode())]
DROP_REASONS = ("buffer_full", "rejected", "shutdown")


class EventsMetrics:
    """hopwatch_events_*: what went out, what was given up and why, what waits."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "hopwatch_events_published", "Events the broker acknowledged, by CloudEvents type.",
            ["type"], registry=registry,
        )  # fmt: skip
        self.dropped = Counter(
            "hopwatch_events_dropped",
            "Events given up: buffer_full (broker away too long), rejected (the broker or the "
            "encoder refused it), shutdown (unsent at exit).",
            ["reason"], registry=registry,
        )  # fmt: skip
        self.buffered = Gauge(
            "hopwatch_events_buffered", "Events and results waiting to be published.",
            registry=registry,
        )  # fmt: skip
        for type_ in EVENT_TYPES:
            self.published.labels(type_)  # at 0 from the start, so rate() sees the first
        for reason in DROP_REASONS:
            self.dropped.labels(reason)


def _retriable(exc: BaseException) -> bool:
    """Worth another try later (the broker is away or moving), as opposed to a refusal."""
    if isinstance(exc, KafkaTimeoutError):  # aiokafka marks it final; it means "no broker yet"
        return True
    return not isinstance(exc, KafkaError) or bool(exc.retriable)


class EventsSink:
    """A Sink publishing CloudEvents; `book` is the store's when there is one (see above)."""

    def __init__(
        self,
        settings: EventsSettings,
        cluster: Cluster,
        *,
        replica: str,
        registry: CollectorRegistry,
        book: IncidentBook | None = None,
        batch_size: int = 500,
        retry_min_s: float = 0.2,
        retry_max_s: float = 10.0,
        close_timeout_s: float = 5.0,
    ) -> None:
        self.topic = settings.topic
        self.max_buffer = settings.buffer
        self.cluster = cluster
        self.source = source_of(replica)
        self.metrics = EventsMetrics(registry)
        self.metrics.buffered.set_function(lambda: self.buffered)
        self.batch_size = batch_size
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.close_timeout_s = close_timeout_s
        self._own_book = book is None  # no store: this sink decides incidents itself
        self.book = IncidentBook() if book is None else book
        self.book.observe(self._incident_changed)
        self._incoming: deque[RunResult] = deque()  # results not yet turned into events
        self._outgoing: deque[Event] = deque()  # encoded, waiting for the broker
        self._sending: list[Event] = []  # out of the buffer while the broker has them
        self._producer: AIOKafkaProducer | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()  # failed producers being stopped

    @property
    def buffered(self) -> int:
        return len(self._incoming) + len(self._outgoing) + len(self._sending)

    # -- the sink side -------------------------------------------------------------------

    def submit(self, result: RunResult) -> None:
        """Queue a result; never blocks, never raises on a full buffer (drops the oldest)."""
        if self._stop.is_set():
            self.metrics.dropped.labels("shutdown").inc()
            return
        self._incoming.append(result)
        self._make_room()
        self._wake.set()

    def _incident_changed(self, transition: Transition, incident: Incident) -> None:
        # Encoded now: the book changes the incident later (called from the store's writer).
        if self._stop.is_set() and self._task is None:
            self.metrics.dropped.labels("shutdown").inc()
            return
        self._outgoing.append(incident_event(transition, incident, self.source))
        self._make_room()
        self._wake.set()

    def _make_room(self) -> None:
        """Drop the oldest waiting events (not those the broker has now) beyond the buffer."""
        while self.buffered > self.max_buffer and (self._outgoing or self._incoming):
            if self._outgoing:
                self._outgoing.popleft()
            else:
                self._incoming.popleft()
            self.metrics.dropped.labels("buffer_full").inc()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the publisher; a broker that is down does not stop this (a bad TLS key does)."""
        if self._task is None:
            self.cluster.tls()
            self._task = asyncio.create_task(self._run(), name="hopwatch-events")

    async def close(self) -> None:
        """Publish what is buffered if the broker lets us within the close budget, then stop."""
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, self.close_timeout_s)
            self._task = None
        self._decide()  # results that came after the last round, for the count below
        if self.buffered:
            log.warning("events: %d unpublished at exit", self.buffered)
            self.metrics.dropped.labels("shutdown").inc(self.buffered)
            self._incoming.clear()
            self._outgoing.clear()
            self._sending.clear()
        await self._discard_producer()

    # -- the publisher -------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self.retry_min_s
        while True:
            if not self.buffered and not self._stop.is_set():
                await self._wake.wait()
            self._wake.clear()
            sent_all = await self._drain()
            if self._stop.is_set():
                return  # one last round was made after the stop
            if sent_all:
                backoff = self.retry_min_s
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._stop.wait()
            backoff = min(backoff * 2, self.retry_max_s)

    async def _drain(self) -> bool:
        """Publish everything buffered; False when the broker could not take it (retry later)."""
        while True:
            self._decide()
            if not self._outgoing:
                return True
            try:
                if not await self._send_batch():
                    return False
            except Exception as exc:  # no producer: broker away, or a secret gone
                self._failed(exc)
                return False

    def _decide(self) -> None:
        """Results become events: the run's own, then (own book) the incident changes."""
        while self._incoming:
            result = self._incoming.popleft()
            try:
                self._outgoing.append(run_finished(result, self.source))
                if self._own_book:
                    self.book.apply(result)  # the observer queues the changes
            except Exception:  # a malformed result must not wedge the publisher
                self.metrics.dropped.labels("rejected").inc()
                log.exception("events cannot encode run %s", getattr(result, "run_id", "?"))

    async def _send_batch(self) -> bool:
        """Send up to `batch_size` events at once and wait for the acks; True if none is left
        to retry. Refused events are dropped and counted; the rest go back to the front."""
        producer = await self._get_producer()
        count = min(self.batch_size, len(self._outgoing))
        self._sending = [self._outgoing.popleft() for _ in range(count)]
        sent: list[tuple[Event, asyncio.Future[object]]] = []
        retry: list[Event] = []
        unsent: list[Event] = []
        problem: BaseException | None = None
        try:
            for i, event in enumerate(self._sending):
                try:
                    future = await producer.send(
                        self.topic, event.value, key=event.key, headers=HEADERS
                    )
                except Exception as exc:
                    if _retriable(exc):
                        problem, unsent = exc, self._sending[i:]
                        break
                    self._refused(event, exc)
                    continue
                sent.append((event, future))
            acks = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
        except asyncio.CancelledError:
            self._requeue(self._sending)
            raise
        for (event, _), ack in zip(sent, acks, strict=True):
            if not isinstance(ack, BaseException):
                self.metrics.published.labels(event.type).inc()
            elif _retriable(ack):
                problem = problem or ack
                retry.append(event)
            else:
                self._refused(event, ack)
        if problem is not None:
            self._requeue(retry + unsent)  # in their first order: the acks' come first
            self._failed(problem)
            return False
        self._sending = []
        return True

    def _requeue(self, events: list[Event]) -> None:
        self._sending = []
        self._outgoing.extendleft(reversed(events))
        self._make_room()

    def _refused(self, event: Event, exc: BaseException) -> None:
        self.metrics.dropped.labels("rejected").inc()
        log.error("events: %s refused by %s: %s", event.type, self.cluster.name, describe(exc))

    def _failed(self, exc: BaseException) -> None:
        """The broker could not take the events: a fresh producer next time (as Producers do)."""
        first = self.cluster.health.producer != "down"
        self.cluster.health.producer = "down"
        self.cluster.failed(exc)
        if first:
            log.warning("events: %s unavailable, buffering: %s", self.cluster.name, describe(exc))
        producer, self._producer = self._producer, None
        if producer is not None:  # stopped aside: the retry need not wait for it
            task = asyncio.create_task(stop_quietly(producer))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def _get_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(**self.cluster.client_options(), acks="all", linger_ms=5)
            try:
                await producer.start()
            except BaseException:
                await stop_quietly(producer)
                raise
            if self.cluster.health.producer == "down":
                log.info("events: %s is back, publishing", self.cluster.name)
            self.cluster.health.producer = "up"
            self._producer = producer
        return self._producer

    async def _discard_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await stop_quietly(producer)
        for task in list(self._stopping):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def events_sink(
    settings: EventsSettings,
    clusters: Mapping[str, KafkaCluster],
    *,
    replica: str | None,
    registry: CollectorRegistry,
    book: IncidentBook | None,
) -> EventsSink:
    """The sink for `settings.events`; `replica` None outside a cluster (host name and pid)."""
    if settings.cluster not in clusters:
        known = ", ".join(sorted(clusters)) or "none"
        raise ConfigError(
            [f"settings.events.cluster: {settings.cluster!r} is not in kafka.clusters "
             f"(known: {known})"]
        )  # fmt: skip
    name = settings.cluster
    cluster = Cluster(name, clusters[name], ClusterHealth(name, (settings.topic,)))
    return EventsSink(
        settings, cluster, replica=replica or default_replica(), registry=registry, book=book
    )
