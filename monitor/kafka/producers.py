"""A cluster's producers, one per acks setting: made on first use and replaced after a failure."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from monitor.kafka.cluster import Cluster, stop_quietly
from monitor.kafka.errors import translate
from monitor.kafka.sequence import SEQ_HEADER, Stamper
from probes.kafka_port import Acks

__all__ = ["Produced", "Producers"]


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


class Producers:
    """The producers of one cluster. A failed one is dropped, so the next send makes a fresh
    one (and fails fast if the broker is still gone): a broker back up needs no restart."""

    def __init__(self, cluster: Cluster, stamper: Stamper) -> None:
        self._cluster = cluster
        self._stamper = stamper
        self._producers: dict[Acks, AIOKafkaProducer] = {}
        self._lock = asyncio.Lock()  # one producer made per acks, however many steps ask at once
        self._background: set[asyncio.Task[None]] = set()

    async def produce(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        acks: Acks,
        partition: int | None,
    ) -> Produced:
        """Send one record, stamped with `hopwatch-seq`, and wait for the broker's ack."""
        cluster = self._cluster
        producer, connect_s = await self._producer(acks)
        seq = self._stamper.next_seq(cluster.name, topic, key)
        all_headers = [(k, v) for k, v in headers if k != SEQ_HEADER]
        all_headers.append((SEQ_HEADER, str(seq).encode()))
        sent_at = time.monotonic()
        try:
            meta = await producer.send_and_wait(
                topic, value, key=key, partition=partition, headers=all_headers
            )
        except BaseException as exc:  # cancelled by the step timeout too: the producer is suspect
            self._discard(acks, producer, exc)
            if isinstance(exc, Exception):
                raise translate(exc, f"produce to {cluster.name}/{topic}") from exc
            raise
        cluster.health.producer = "up"
        return Produced(
            topic=meta.topic,
            partition=meta.partition,
            offset=meta.offset,
            seq=seq,
            sent_at=sent_at,
            latency_s=time.monotonic() - sent_at,
            connect_s=connect_s,
        )

    async def close(self) -> None:
        """Stop every producer, and wait for those being stopped after a failure."""
        for acks, producer in list(self._producers.items()):
            del self._producers[acks]
            await stop_quietly(producer)
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _producer(self, acks: Acks) -> tuple[AIOKafkaProducer, float | None]:
        """The producer for `acks`, made now if there is none (first use, or after a failure)."""
        cluster = self._cluster
        async with self._lock:
            producer = self._producers.get(acks)
            if producer is not None:
                return producer, None
            producer = AIOKafkaProducer(**cluster.client_options(), acks=acks)
            started = time.monotonic()
            try:
                await producer.start()
            except BaseException as exc:
                cluster.health.producer = "down"
                cluster.failed(exc)
                await stop_quietly(producer)
                if isinstance(exc, Exception):
                    raise translate(exc, f"connect to {cluster.name}") from exc
                raise
            self._producers[acks] = producer
            return producer, time.monotonic() - started

    def _discard(self, acks: Acks, producer: AIOKafkaProducer, exc: BaseException) -> None:
        """Drop a producer that failed. The old one is stopped in the background, so in-flight
        sends of other runs finish or fail on their own."""
        self._cluster.health.producer = "down"
        self._cluster.failed(exc)
        if self._producers.get(acks) is producer:
            del self._producers[acks]
            task = asyncio.create_task(stop_quietly(producer))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
