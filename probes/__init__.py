"""Every step kind, listed once: the discriminated config union and the probe registry."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from probes import http, http_poll, kafka_consume, kafka_produce, webhook_await

StepConfig = Annotated[
    http.Config
    | http_poll.Config
    | webhook_await.Config
    | kafka_produce.Config
    | kafka_consume.Config,
    Field(discriminator="kind"),
]

PROBES: dict[str, Any] = {
    "http": http.HttpProbe(),
    "http_poll": http_poll.HttpPollProbe(),
    "webhook_await": webhook_await.WebhookAwaitProbe(),
    "kafka_produce": kafka_produce.KafkaProduceProbe(),
    "kafka_consume": kafka_consume.KafkaConsumeProbe(),
}
