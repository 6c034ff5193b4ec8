"""The Kafka port: what the Kafka kinds may ask of the engine's clients, so probes never import it.

The engine (`monitor.kafka.clients.KafkaClients`) fits these protocols and lends itself through
`StepContext.kafka`; a probe sees only what is below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

__all__ = ["Acks", "ConsumerHealth", "KafkaPort", "ProducedRecord"]

Acks = Literal["all", 0, 1]  # all in-sync replicas, the leader only, or none


class ProducedRecord(Protocol):
    """A record the broker acknowledged."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def seq(self) -> int:
        """The per-key `hopwatch-seq` the record was stamped with."""
        ...

    @property
    def latency_s(self) -> float:
        """Send → ack."""
        ...

    @property
    def connect_s(self) -> float | None:
        """Producer set-up, when this send had to make one."""
        ...


class ConsumerHealth(Protocol):
    """The state of a cluster's shared consumer, as far as a waiting step needs it."""

    @property
    def consumer(self) -> str:
        """One of off, starting, up and down."""
        ...

    @property
    def last_error(self) -> str | None: ...


class KafkaPort(Protocol):
    """Producers and the shared consumers of every configured cluster, lent by the engine."""

    async def produce(
        self,
        cluster: str,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None = ...,
        headers: Sequence[tuple[str, bytes]] = ...,
        acks: Acks = ...,
        partition: int | None = ...,
    ) -> ProducedRecord:
        """Send one record, stamped with `hopwatch-seq`, and wait for the broker's ack."""
        ...

    def watching(self, cluster: str, topic: str) -> bool:
        """Whether the cluster's shared consumer reads `topic`."""
        ...

    def health(self) -> Mapping[str, ConsumerHealth]:
        """Per cluster name: its shared consumer's state."""
        ...
