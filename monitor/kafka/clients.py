"""`KafkaClients`: the one object the engine owns for Kafka, every cluster's two sides behind it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from monitor.kafka.cluster import Cluster, ClusterHealth
from monitor.kafka.consumer import SharedConsumer
from monitor.kafka.producers import Produced, Producers
from monitor.kafka.sequence import OrderCheck, Stamper
from monitor.kafka.settings import KafkaCluster
from monitor.rejects import RejectLog
from probes.arrivals import Arrival
from probes.errors import ConfigError
from probes.kafka_port import Acks

if TYPE_CHECKING:
    from monitor.metric_types import LabelledCounter
    from probes.kafka_port import KafkaPort

__all__ = ["KafkaClients"]


@dataclass(slots=True)
class _Entry:
    """One configured cluster's two sides, which share its settings, TLS context and health."""

    cluster: Cluster
    producers: Producers
    consumer: SharedConsumer


class KafkaClients:
    """Producers and shared consumers for every configured cluster; owned by the engine, lent to
    the Kafka kinds as their `KafkaPort`. A broker that is down only fails the steps that need
    it; both sides reconnect on their own, without a restart."""

    def __init__(
        self,
        clusters: Mapping[str, KafkaCluster],
        *,
        on_arrival: Callable[[Arrival], object] | None = None,
        topics: Mapping[str, Iterable[str]] | None = None,
        arrivals_counter: LabelledCounter | None = None,
    ) -> None:
        self.on_arrival = on_arrival
        self._stamper = Stamper()  # (cluster, topic, key) → last sequence stamped
        order = OrderCheck(arrivals_counter)  # (channel, key) → highest sequence seen
        rejects = RejectLog(arrivals_counter, source="kafka", what="kafka consumer")
        self._clusters: dict[str, _Entry] = {}
        for name, config in clusters.items():
            cluster = Cluster(name, config, ClusterHealth(name, ()))
            self._clusters[name] = _Entry(
                cluster,
                Producers(cluster, self._stamper),
                SharedConsumer(cluster, order, self._offer, rejects),
            )
        self._started = False
        for cluster_name, names in (topics or {}).items():
            for topic in names:
                self.watch(cluster_name, topic)

    # -- set-up ------------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        try:
            return self._clusters[name]
        except KeyError:
            known = ", ".join(sorted(self._clusters)) or "none"
            raise ConfigError(
                [f"kafka cluster {name!r} is not configured (known: {known})"]
            ) from None

    def watch(self, cluster: str, topic: str) -> None:
        """Add a topic to the cluster's shared consumer; only before `start()`."""
        consumer = self._entry(cluster).consumer
        if topic in consumer.topics:
            return
        if self._started:
            raise RuntimeError(f"watch({cluster!r}, {topic!r}) after start(): topics are fixed")
        consumer.watch(topic)

    async def rewatch(self, wanted: Iterable[tuple[str, str]]) -> None:
        """Watch exactly these (cluster, topic) pairs from now on (a reload): a cluster whose
        topic set changed restarts its shared consumer, from the end of its topics; the
        others go on undisturbed."""
        by_cluster: dict[str, set[str]] = {name: set() for name in self._clusters}
        for cluster, topic in wanted:
            self._entry(cluster)
            by_cluster[cluster].add(topic)
        for name, topics in by_cluster.items():
            entry = self._clusters[name]
            if topics == entry.consumer.topics:
                continue
            entry.consumer.cancel()
            await entry.consumer.join()
            entry.consumer.topics.clear()
            for topic in sorted(topics):
                entry.consumer.watch(topic)
            entry.cluster.health.topics = tuple(sorted(topics))
            if self._started:
                entry.consumer.start()

    def watching(self, cluster: str, topic: str) -> bool:
        entry = self._clusters.get(cluster)
        return entry is not None and topic in entry.consumer.topics

    async def start(self) -> None:
        """Start one consumer per cluster with watched topics; never fails for a down broker
        (a bad TLS key or secret is a ConfigError, though)."""
        if self._started:
            return
        self._started = True
        for entry in self._clusters.values():
            entry.cluster.tls()
            entry.consumer.start()

    async def close(self) -> None:
        """Stop consumers and producers; bounded even when brokers are unreachable."""
        for entry in self._clusters.values():
            entry.consumer.cancel()
        for entry in self._clusters.values():
            await entry.consumer.join()
        for entry in self._clusters.values():
            await entry.producers.close()
        self._started = False

    # -- health ------------------------------------------------------------------------------

    def health(self) -> dict[str, ClusterHealth]:
        """Per cluster: consumer and producer state, the last error, the last record seen."""
        return {name: entry.cluster.health for name, entry in self._clusters.items()}

    async def wait_consumer(self, cluster: str | None = None, state: str = "up") -> None:
        """Return once the shared consumer of `cluster` (default: every one) is in `state`;
        callers bound it with `asyncio.timeout` (e.g. the engine before its first run)."""
        names = (
            [cluster]
            if cluster is not None
            else [n for n, e in self._clusters.items() if e.consumer.topics]
        )
        for name in names:
            await self._entry(name).consumer.wait(state)

    # -- producing ---------------------------------------------------------------------------

    def next_seq(self, cluster: str, topic: str, key: bytes | None) -> int:
        """A per-key sequence that grows across runs and replicas: max(last + 1, unix µs)."""
        return self._stamper.next_seq(cluster, topic, key)

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
        return await self._entry(cluster).producers.produce(
            topic, value=value, key=key, headers=headers, acks=acks, partition=partition
        )

    # -- the shared consumers' records -------------------------------------------------------

    def _offer(self, arrival: Arrival) -> None:
        # Read at each record, not bound at construction: the callback may be set later.
        if self.on_arrival is not None:
            self.on_arrival(arrival)


if TYPE_CHECKING:

    def _fits_the_port(clients: KafkaClients) -> KafkaPort:
        """mypy proves here that the facade still gives the probes what they are typed against."""
        return clients
