"""The `kafka_produce` kind: put one marked, traceable synthetic record on a topic; time the ack.

Every record carries, as headers, the synthetic-traffic marker, the trace context, the run's
correlation id (`hopwatch-correlation`) and a per-key sequence (`hopwatch-seq`) that a
`kafka_consume` step uses to tell records that arrive out of order. The hop's latency is
send → broker ack; setting up a producer, when one had to be made, is the `connect` phase.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, model_validator

from probes.base import StepConfigBase, StepContext, StepOutcome
from probes.kafka_port import Acks
from probes.kinds import KindSpec, SpanShape, render_quietly

CORRELATION_HEADER = "hopwatch-correlation"  # the run's correlation id; kafka_consume matches it


class Config(StepConfigBase):
    """Produce one record to a Kafka topic and wait for the broker to acknowledge it."""

    kind: Literal["kafka_produce"] = Field(description="Step kind.")
    cluster: str = Field(description="Name of a cluster under `kafka.clusters`; required.")
    topic: str = Field(min_length=1, description="Topic (a template); required.")
    key: str | None = Field(
        default=None,
        description="Record key (a template), e.g. `{{ run.correlation }}`; default: no key. "
        "Order is checked per key, so give one when order matters.",
    )
    value: Any = Field(
        default=None,
        description="Record value as JSON: every string in it is a template; default: none "
        "(then `raw_value`, or an empty value).",
    )
    raw_value: str | bytes | None = Field(
        default=None,
        description="Record value sent as is: a template sent as UTF-8, or bytes (YAML "
        "`!!binary`); default: none. Give `value` or `raw_value`, not both.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra record headers, name → template; default: none. The marker, trace "
        "context, hopwatch-correlation and hopwatch-seq headers are always added.",
    )
    partition: int | None = Field(
        default=None, ge=0, description="Partition to write to; default: chosen by the key."
    )
    acks: Acks = Field(
        default="all",
        description="Acknowledgement wanted: all (every in-sync replica), 1 (the leader) or 0 "
        "(none: latency is then only the local send); default all.",
    )

    @model_validator(mode="after")
    def _one_value(self) -> Config:
        if self.value is not None and self.raw_value is not None:
            raise ValueError("give value or raw_value, not both")
        return self


def _value_bytes(config: Config, ctx: StepContext) -> bytes | None:
    if config.value is not None:
        rendered = ctx.render_value(config.value)
        return json.dumps(rendered, separators=(",", ":"), ensure_ascii=False).encode()
    if isinstance(config.raw_value, bytes):
        return config.raw_value
    if config.raw_value is not None:
        return ctx.render(config.raw_value).encode()
    return None


def record_headers(config: Config, ctx: StepContext) -> list[tuple[str, bytes]]:
    """The step's own headers, then the ones hopwatch always adds (these win on a clash)."""
    headers = {name: ctx.render(value, "header") for name, value in config.headers.items()}
    headers.update(ctx.outgoing_headers())
    headers[CORRELATION_HEADER] = ctx.run.correlation
    return [(name, value.encode()) for name, value in headers.items()]


class KafkaProduceProbe:
    """Sends the step's record through the engine's producer for the cluster."""

    async def run(self, config: Config, ctx: StepContext) -> StepOutcome:
        if ctx.kafka is None:
            raise RuntimeError("kafka_produce needs the engine's KafkaClients (kafka: clusters)")
        clients = ctx.kafka
        topic = ctx.render(config.topic)
        key = ctx.render(config.key).encode() if config.key is not None else None
        produced = await clients.produce(
            config.cluster,
            topic,
            value=_value_bytes(config, ctx),
            key=key,
            headers=record_headers(config, ctx),
            acks=config.acks,
            partition=config.partition,
        )
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.destination.name": produced.topic,
            "messaging.destination.partition.id": str(produced.partition),
            "messaging.kafka.offset": produced.offset,
        }
        if key is not None:
            attributes["messaging.kafka.message.key"] = key.decode("utf-8", "replace")
        phases = {"connect": produced.connect_s} if produced.connect_s is not None else {}
        return StepOutcome(
            latency_s=produced.latency_s,
            vars={
                "topic": produced.topic,
                "partition": produced.partition,
                "offset": produced.offset,
                "seq": produced.seq,
            },
            phases=phases,
            attributes=attributes,
        )


def _span(config: Config, ctx: StepContext) -> SpanShape:
    topic = render_quietly(ctx, config.topic)
    attrs = {"messaging.system": "kafka", "messaging.destination.name": topic}
    return SpanShape(f"send {topic}", "producer", attrs | {"messaging.operation.type": "send"})


SPEC = KindSpec(Config, KafkaProduceProbe(), span=_span, cluster=lambda config: config.cluster)
