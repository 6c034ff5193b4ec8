"""A cluster's one shared consumer: reads every watched topic from its end and offers each record.

It starts with the monitor, belongs to no consumer group (observing, not consuming: every
replica sees every record), hands each record on as an `Arrival`, and remakes itself after a
crash, so a broker that comes back needs no restart.

A poison record (over `probes.untrusted_json.MAX_BYTES`, not UTF-8, or JSON-looking but not
decodable within the nesting limit) is counted `malformed` and skipped, never offered; no
record can crash the consumer (which would restart it and re-read). A record that is plain
text is offered, marked `not_json`, for steps that match it by key or header; the correlator
counts it `malformed` rather than `unmatched` if no step claims it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from monitor.kafka.cluster import Cluster, ConsumerState, stop_quietly
from monitor.kafka.sequence import SEQ_HEADER, OrderCheck
from monitor.rejects import RejectLog
from probes import untrusted_json
from probes.arrivals import Arrival, channel_name

__all__ = ["SharedConsumer"]

log = logging.getLogger(__name__)

_POLL_MS = 500  # longest a getmany waits when the topics are quiet
_MAX_RECORDS = 500
_BACKOFF_MIN_S = 0.2
_BACKOFF_MAX_S = 5.0
_METADATA_MAX_AGE_MS = 3_000  # how soon partitions added to a watched topic are seen (a
# broker back with empty storage re-creates topics with its default partition count)
_REPLAY_LIMIT = 1000  # records re-read from a log that went backwards (a broker that lost it)


class SharedConsumer:
    """The consumer of one cluster's watched topics; `offer` gets every record as an Arrival."""

    def __init__(
        self,
        cluster: Cluster,
        order: OrderCheck,
        offer: Callable[[Arrival], object],
        rejects: RejectLog | None = None,
    ) -> None:
        self._cluster = cluster
        self._order = order
        self._offer = offer
        self._rejects = rejects or RejectLog(None, source="kafka", what="kafka consumer")
        self.topics: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def watch(self, topic: str) -> None:
        self.topics.add(topic)
        self._cluster.health.topics = tuple(sorted(self.topics))

    def start(self) -> None:
        """Start reading, if any topic is watched; a down broker only makes it retry."""
        if self.topics:
            self._set_state("starting")
            self._task = asyncio.create_task(
                self._consume_forever(), name=f"kafka-consumer-{self._cluster.name}"
            )

    def cancel(self) -> None:
        """Ask the consumer to stop; `join` waits for it (many clusters stop at once)."""
        if self._task is not None:
            self._task.cancel()

    async def join(self) -> None:
        """Wait until a cancelled consumer has stopped; its state is then `off`."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        self._set_state("off")

    async def wait(self, state: str) -> None:
        """Return once the consumer is in `state`; callers bound it with `asyncio.timeout`."""
        while self._cluster.health.consumer != state:
            await self._changed.wait()

    def _set_state(self, state: ConsumerState) -> None:
        if self._cluster.health.consumer != state:
            self._cluster.health.consumer = state
            # Wake every waiter once, and give later waiters a fresh event to wait on.
            self._changed.set()
            self._changed = asyncio.Event()

    def _new_consumer(self) -> AIOKafkaConsumer:
        cluster = self._cluster
        return AIOKafkaConsumer(
            *sorted(self.topics),
            **cluster.client_options(),
            group_id=None,  # see the README: observing, not consuming; every replica sees all
            enable_auto_commit=False,
            # Reading "from the end" is done by an explicit seek at start; partitions that
            # appear later (a topic created after us, a broker that lost its log) are new,
            # so they are read from their beginning.
            auto_offset_reset="earliest",
            fetch_max_wait_ms=int(cluster.config.fetch_max_wait * 1000),
            metadata_max_age_ms=_METADATA_MAX_AGE_MS,
        )

    async def _consume_forever(self) -> None:
        """Keep one consumer alive for the cluster: make it, read, and remake it after a crash."""
        cluster = self._cluster
        backoff = _BACKOFF_MIN_S
        while True:
            consumer = self._new_consumer()
            try:
                async with asyncio.timeout(cluster.config.request_timeout * 2):
                    await consumer.start()
                    await _seek_to_end(consumer)
                self._set_state("up")
                backoff = _BACKOFF_MIN_S
                await self._pump(consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # down broker, auth refused, our bug: retry, never die
                cluster.failed(exc)
                self._set_state("down")
                log.warning(
                    "kafka consumer for %s failed: %s", cluster.name, cluster.health.last_error
                )
            finally:
                await stop_quietly(consumer)
            cluster.health.consumer_restarts += 1
            await asyncio.sleep(backoff)  # a timer by nature: nothing to await but time
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _pump(self, consumer: AIOKafkaConsumer) -> None:
        interval = self._cluster.config.health_interval
        next_check = time.monotonic() + interval
        while True:
            batches = await consumer.getmany(timeout_ms=_POLL_MS, max_records=_MAX_RECORDS)
            received_at, received_unix = time.monotonic(), time.time()
            for records in batches.values():
                for record in records:
                    try:
                        self._deliver(record, received_at, received_unix)
                    except Exception as exc:  # one odd record must not restart the consumer
                        self._rejects.reject(
                            "undeliverable record",
                            f"{record.topic}/{record.partition}/{record.offset}: "
                            f"{type(exc).__name__}",
                        )
            if time.monotonic() >= next_check:
                await self._check(consumer)
                next_check = time.monotonic() + interval

    async def _check(self, consumer: AIOKafkaConsumer) -> None:
        """Ask the broker for each partition's end offset: proves it answers, and catches a log
        that went backwards (a broker that lost its data), which no fetch error reports."""
        cluster = self._cluster
        try:
            async with asyncio.timeout(cluster.config.request_timeout):
                if not consumer.assignment():
                    await consumer.topics()  # still prove the broker answers
                fresh_s = max(3 * cluster.config.fetch_max_wait, 1.0)
                for tp, (end, position) in (await logs_gone_back(consumer, fresh_s)).items():
                    starts = await consumer.beginning_offsets([tp])
                    consumer.seek(tp, max(starts[tp], end - _REPLAY_LIMIT))
                    cluster.health.log_resets += 1
                    log.warning(
                        "%s %s: log end %d < position %d, re-reading",
                        cluster.name,
                        tp,
                        end,
                        position,
                    )
        except (KafkaError, TimeoutError, OSError) as exc:
            cluster.failed(exc)
            self._set_state("down")
            return
        self._set_state("up")

    def _deliver(self, record: Any, received_at: float, received_unix: float) -> None:
        """Turn a record into an Arrival, note its order, and hand it to `offer`."""
        cluster = self._cluster
        headers: dict[str, str] = {}
        for name, raw in record.headers or ():
            headers.setdefault(name, raw.decode("utf-8", "replace") if raw is not None else "")
        body: bytes = record.value or b""
        where = f"{cluster.name}/{record.topic}/{record.partition}/{record.offset}"
        doc: Any = None
        not_json = False
        if body:
            try:
                doc = untrusted_json.loads(body)
            except untrusted_json.NotJson as exc:
                if _poison(body):
                    self._rejects.reject("poison record", f"{where}: {exc}")
                    return
                not_json = True
        channel = channel_name(cluster.name, record.topic)
        meta: dict[str, Any] = {
            "cluster": cluster.name,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "timestamp_unix": record.timestamp / 1000 if (record.timestamp or -1) >= 0 else None,
        }
        if not_json:
            meta["not_json"] = True
        self._order.note(channel, record.key, headers.get(SEQ_HEADER), meta)
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
        cluster.health.last_record_unix = received_unix
        try:
            self._offer(arrival)
        except Exception:  # the callback's bug must not stop the shared consumer
            log.exception("arrival callback failed for %s", arrival.delivery_id)


async def logs_gone_back(consumer: AIOKafkaConsumer, fresh_s: float) -> dict[Any, tuple[int, int]]:
    """The assigned partitions whose log went backwards (a broker that lost its data), each
    with its end and the consumer's position; fetches older than `fresh_s` are not evidence."""
    partitions = list(consumer.assignment())
    if not partitions:
        return {}
    # Positions first: the end can only grow after them, so `end < position` then means the
    # log really went backwards, not that records came in between.
    positions = {tp: await consumer.position(tp) for tp in partitions}
    since_ms = time.time() * 1000 - fresh_s * 1000
    ends = await consumer.end_offsets(partitions)
    return {
        tp: (end, positions[tp])
        for tp, end in ends.items()
        if end < positions[tp] and not _fetched_past(consumer, tp, positions[tp], since_ms)
    }


def _fetched_past(consumer: AIOKafkaConsumer, tp: Any, position: int, since_ms: float) -> bool:
    """Whether a fetch answered since `since_ms` put the partition's end at or past `position`.

    Some brokers answer ListOffsets with less than the log's end (Tansu: the last batch's base
    offset + 1, so a batch of three reads two short), while fetch responses carry the true high
    watermark. A log that really went backwards shows in fresh fetches too (or stops them, and
    then the timestamp is old), so only an end that fetches do not contradict means a reset.
    """
    highwater = consumer.highwater(tp)
    polled_ms = consumer.last_poll_timestamp(tp)
    return (
        highwater is not None
        and polled_ms is not None
        and polled_ms >= since_ms
        and highwater >= position
    )


def _poison(body: bytes) -> bool:
    """Whether a record that is not JSON is poison rather than plain text: too big, not UTF-8,
    or claiming to be a JSON object or array (nested too deep, or broken)."""
    if len(body) > untrusted_json.MAX_BYTES or body.lstrip()[:1] in (b"{", b"["):
        return True
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


async def _seek_to_end(consumer: AIOKafkaConsumer) -> None:
    """Position every assigned partition at its end now, so no record produced after this
    returns is missed and none produced before it is replayed."""
    partitions = list(consumer.assignment())
    if partitions:
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)
