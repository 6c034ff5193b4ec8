"""The `settings.events` section of a flow file: where events go (no Kafka import)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


class EventsSettings(BaseModel):
    """Publish run results and incident changes as CloudEvents to one Kafka topic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cluster: str = Field(
        description="A `kafka.clusters` entry of the same file (its SASL/TLS settings apply); "
        "required, no default."
    )
    topic: str = Field(
        default="hopwatch.events",
        description="Topic the events go to (create it, or let the broker auto-create it); "
        "default hopwatch.events.",
    )
    buffer: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Events held while the broker is away; beyond it the oldest are dropped "
        "and counted; default 10000.",
    )

    @field_validator("topic")
    @classmethod
    def _kafka_topic(cls, value: str) -> str:
        if not _TOPIC.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a Kafka topic name (want 1-249 of letters, digits, . _ -)"
            )
        return value
