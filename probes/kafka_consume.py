"""The `kafka_consume` kind: see that the record a run should cause really appears on a topic.

The step never consumes by itself: the engine's one shared consumer per cluster reads every
watched topic from its end and offers each record to the correlator. The step registers its
expectation when the run starts (`expect`), before the triggering step runs, so a record that
beats the trigger's own answer is never lost. When the step runs it renders its match rule,
waits until `within` after its own start, and then checks, in this order: that the record is in
order for its key (`out_of_order`), the assertions and extraction (`assertion`, `extract`), and,
if asked to wait for one, that no second matching record came (`duplicate`).

The hop's latency is produce → observe: from the triggering step's start (by default the
previous step, typically a `kafka_produce` or an HTTP call) to the moment the shared consumer
received the record.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final, Literal

from pydantic import Field, field_validator

from probes.arrivals import Arrival, Registration, channel_name
from probes.base import StepConfigBase, StepContext, StepOutcome
from probes.checks import Expect, ExtractRule
from probes.durations import Duration
from probes.errors import AssertionFailed, ConnectError, NotReceived, OutOfOrder, StepFailed
from probes.kafka_port import KafkaPort
from probes.kafka_produce import CORRELATION_HEADER
from probes.kinds import KindSpec, SpanShape
from probes.selectors import Scalar
from probes.waiting import (
    MatchBase,
    Rule,
    RuleMatcher,
    annotate,
    assess,
    await_arrival,
    latency_from_form,
    no_duplicate,
    no_status,
    own_latency,
    register,
    rendered_matcher,
    since_sent,
    since_step,
    wait_attributes,
)

__all__ = ["Config", "KafkaConsumeProbe", "Match", "Scalar"]

KIND: Final = "kafka_consume"


class Match(MatchBase):
    """Which record belongs to this run: every given header, JSON value and the key must equal."""

    header: dict[str, Scalar] = Field(
        default_factory=dict,
        description="Record header name → wanted value (a template); default: none.",
    )
    key: str | None = Field(
        default=None, description="Wanted record key (a template); default: any key."
    )


class Config(StepConfigBase):
    """Wait for a record on a watched topic that matches this run."""

    kind: Literal["kafka_consume"] = Field(description="Step kind.")
    cluster: str = Field(description="Name of a cluster under `kafka.clusters`; required.")
    topic: str = Field(
        min_length=1,
        description="Topic to watch; required. A literal, not a template: the shared consumer "
        "subscribes to it when the monitor starts.",
    )
    match: Match | None = Field(
        default=None,
        description="How to recognise this run's record; default: the hopwatch-correlation "
        "header equal to the run's correlation id, which kafka_produce sets and a service "
        "that forwards headers keeps.",
    )
    within: Duration = Field(
        description="How long to wait, from the step's start (a record that came while "
        "earlier steps ran is taken at once); required."
    )
    expect: Expect = Field(
        default_factory=Expect,
        description="Assertions on the record (headers, json, body, json_schema, max_latency "
        "on the produce → observe latency); default: none.",
    )
    extract: dict[str, ExtractRule] = Field(
        default_factory=dict,
        description="Values to take from the record (json, header, regex) for later steps; "
        "default: none.",
    )
    latency_from: str = Field(
        default="trigger",
        description="Where the latency starts: `trigger` (the previous step's start), "
        "`step:<name>` (that step's start) or `record` (the record's own timestamp, a wall "
        "clock set by its producer or the broker); default trigger.",
    )
    duplicate_window: Duration = Field(
        default=0.0,
        description="After the record came, wait this long and fail with `duplicate` if a "
        "second matching one comes (counts toward the step's time); default 0: do not wait. "
        "Duplicates are counted in hopwatch_arrivals_total either way.",
    )

    @field_validator("topic")
    @classmethod
    def _literal_topic(cls, value: str) -> str:
        if "{{" in value or "{%" in value:
            raise ValueError("topic must be a literal: the shared consumer subscribes at start")
        return value

    @field_validator("latency_from")
    @classmethod
    def _latency_from_form(cls, value: str) -> str:
        return latency_from_form(value, ("trigger", "step:<name>", "record"))

    @field_validator("expect")
    @classmethod
    def _no_status(cls, value: Expect) -> Expect:
        return no_status(value, "a Kafka record")


class KafkaConsumeProbe:
    """Registers at run start, then waits for, checks and times the run's record."""

    def expect(self, config: Config, ctx: StepContext) -> None:
        """Register with the correlator before any step of the run runs."""
        _register(config, ctx)

    async def run(self, config: Config, ctx: StepContext) -> StepOutcome:
        started = time.monotonic()
        clients = _clients(config, ctx)
        expectation = _register(config, ctx)
        rule, matcher = _rendered_rule(config, ctx)
        what = f"record on {config.topic} with {rule.describe('any record')}"
        try:
            arrival = await await_arrival(config, ctx, expectation, matcher, started)
        except NotReceived as missing:
            why = _why_missing(config, clients, rule, missing)
            why.attributes.update(wait_attributes(what, None, started))
            raise why from None
        except StepFailed as failed:
            failed.attributes.update(wait_attributes(what, None, started))
            raise
        attributes = _attributes(config, arrival, started) | wait_attributes(what, arrival, started)
        if config.duplicate_window > 0:
            attributes["wait.duplicate_window_s"] = config.duplicate_window
        latency: float | None = None
        try:
            latency = _latency(config, ctx, arrival, started)
            _in_order(arrival)
            values = assess(config, ctx, arrival, latency)
            await no_duplicate(expectation, config.duplicate_window, "record", "")
        except StepFailed as failed:
            annotate(failed, arrival, latency, attributes)
            raise
        own = own_latency(ctx, arrival)
        return StepOutcome(latency_s=latency, vars=values, attributes=attributes, own_latency_s=own)


def _clients(config: Config, ctx: StepContext) -> KafkaPort:
    if ctx.kafka is None:
        raise RuntimeError("kafka_consume needs the engine's KafkaClients (kafka: clusters)")
    clients = ctx.kafka
    if not clients.watching(config.cluster, config.topic):
        raise RuntimeError(
            f"{config.cluster}/{config.topic} is not watched: the engine must watch every "
            "topic the steps' kinds ask for (KindSpec.watches) before start()"
        )
    return clients


def _register(config: Config, ctx: StepContext) -> Registration:
    return register(ctx, KIND, channel_name(config.cluster, config.topic))


def _rendered_rule(config: Config, ctx: StepContext) -> tuple[Rule, RuleMatcher]:
    """The match rule with its templates rendered for this run, and its matcher."""
    if config.match is None:
        rule = Rule({CORRELATION_HEADER: ctx.run.correlation}, {})
        return rule, rule.matcher(_record_header)
    return rendered_matcher(config.match, ctx, "text", _record_header, key=config.match.key)


def _record_header(headers: Mapping[str, str], name: str) -> str | None:
    # Kafka header names are case-sensitive, unlike HTTP's: match them exactly.
    return headers.get(name)


def _why_missing(
    config: Config, clients: KafkaPort, rule: Rule, missing: NotReceived
) -> StepFailed:
    """not_received, unless the shared consumer could not reach the cluster: then the record
    may well be there, and the link is broken by the connection, not by the service."""
    health = clients.health().get(config.cluster)
    if health is not None and health.consumer in ("down", "starting"):
        return ConnectError(
            f"cannot watch {channel_name(config.cluster, config.topic)}: consumer {health.consumer}"
            f" ({health.last_error or 'no connection yet'})"
        )
    return NotReceived(
        f"no record with {rule.describe('any record')} within {config.within:g}s: {missing.message}"
    )


def _in_order(arrival: Arrival) -> None:
    """The shared consumer notes a record whose hopwatch-seq is lower than one already seen
    for its key; Kafka keeps order per key, so the system under watch reordered them."""
    after = arrival.meta.get("out_of_order_after")
    if after is not None:
        key = arrival.key.decode("utf-8", "replace") if arrival.key is not None else ""
        raise OutOfOrder(
            f"record seq {arrival.meta.get('seq')} for key {key!r} came after seq {after}"
        )


def _latency(config: Config, ctx: StepContext, arrival: Arrival, started: float) -> float:
    """Produce → observe latency: from a step's start (monotonic) or the record's timestamp."""
    if config.latency_from != "record":
        return since_step(ctx, arrival, config.latency_from, started)
    stamped = arrival.meta.get("timestamp_unix")
    if stamped is None:
        raise AssertionFailed("latency_from record: the record has no timestamp")
    return since_sent(arrival, float(stamped))


def _attributes(config: Config, arrival: Arrival, started: float) -> dict[str, Any]:
    meta = arrival.meta
    attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": config.topic,
        "messaging.destination.partition.id": str(meta.get("partition")),
        "messaging.kafka.offset": meta.get("offset"),
        "kafka.delivery_id": arrival.delivery_id,
        "kafka.early": arrival.received_at < started,
    }
    if arrival.key is not None:
        attributes["messaging.kafka.message.key"] = arrival.key.decode("utf-8", "replace")
    return attributes


def _span(config: Config, ctx: StepContext) -> SpanShape:
    attrs = {"messaging.system": "kafka", "messaging.destination.name": config.topic}
    name = f"process {config.topic}"
    return SpanShape(name, "consumer", attrs | {"messaging.operation.type": "process"})


_PROBE = KafkaConsumeProbe()
SPEC = KindSpec(
    Config,
    _PROBE,
    span=_span,
    expect=_PROBE.expect,
    cluster=lambda config: config.cluster,
    watches=lambda config: (config.cluster, config.topic),
)
