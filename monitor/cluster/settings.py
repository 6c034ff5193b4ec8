"""The `settings.cluster` section of a flow file: how replicas find each other (no Kafka import)."""

from __future__ import annotations

import os
import socket

from pydantic import BaseModel, ConfigDict, Field, model_validator

from probes.durations import Duration

# A lost replica's flows wait this long before they move. 6 s is the least a stock Kafka broker
# accepts (group.min.session.timeout.ms); every second above it is a second longer handover
# after a crash, and on Tansu half a second more after a SIGTERM too (README, "What a handover
# costs"). Below it needs a broker configured for it, and a replica whose loop stalls that long
# (a saturated core) is taken for dead.
DEFAULT_SESSION_TIMEOUT = 6.0


class ClusterSettings(BaseModel):
    """Replicas that share the flows through one Kafka consumer group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kafka: str | None = Field(
        default=None,
        description="A `kafka.clusters` entry to meet on (its SASL/TLS settings apply); "
        "give this or bootstrap_servers.",
    )
    bootstrap_servers: str | None = Field(
        default=None, description="HOST:PORT[,HOST:PORT…] of the Kafka cluster to meet on."
    )
    group: str = Field(
        default="hopwatch",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Consumer group; its control topic is hopwatch.<group>.flows; "
        "default hopwatch.",
    )
    replica: str | None = Field(
        default=None, description="This replica's name; default host name and process id."
    )
    partitions: int = Field(
        default=32,
        ge=1,
        le=10_000,
        description="Partitions of the control topic when it is created (the unit of "
        "ownership); default 32.",
    )
    session_timeout: Duration = Field(
        default=DEFAULT_SESSION_TIMEOUT,
        description="How long a replica that stopped heartbeating keeps its flows; default 6s "
        "(the least a stock Kafka broker accepts: group.min.session.timeout.ms).",
    )

    @model_validator(mode="after")
    def _one_way_to_meet(self) -> ClusterSettings:
        if (self.kafka is None) == (self.bootstrap_servers is None):
            raise ValueError("give one of kafka (a kafka.clusters name) or bootstrap_servers")
        if not 3.0 <= self.session_timeout <= 300.0:
            raise ValueError("session_timeout must be between 3s and 5m")
        return self

    def control_topic(self) -> str:
        return f"hopwatch.{self.group}.flows"

    def replica_name(self) -> str:
        return self.replica or default_replica()


def default_replica() -> str:
    """Host name and process id: unique on a machine, readable on a board."""
    return f"{socket.gethostname()}-{os.getpid()}"
