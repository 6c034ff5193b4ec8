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
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator

from probes.base import StepConfigBase, StepContext, StepOutcome
from probes.checks import (
    Expect,
    ExtractRule,
    check,
    excerpt,
    extract,
    json_path_get,
    validate_json_path,
)
from probes.durations import Duration
from probes.errors import (
    AssertionFailed,
    ConnectError,
    Duplicate,
    NotReceived,
    OutOfOrder,
    StepFailed,
)
from probes.kafka_produce import CORRELATION_HEADER

if TYPE_CHECKING:  # types only: at run time the engine lends these through ctx
    from monitor.correlator import Arrival, Expectation, Matcher
    from monitor.kafka import KafkaClients

# Stop waiting this much before the run's own deadline so the step fails with what happened
# (not_received) rather than with the runner's generic timeout.
_DEADLINE_MARGIN: Final = 0.01

Scalar = str | int | float | bool


class Match(BaseModel):
    """Which record belongs to this run: every given header, JSON value and the key must equal."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    header: dict[str, Scalar] = Field(
        default_factory=dict,
        description="Record header name → wanted value (a template); default: none.",
    )
    json_: dict[str, Scalar] = Field(
        default_factory=dict,
        alias="json",
        description="JSON path → wanted value (a template), e.g. "
        '`{"$.order_id": "{{ steps.create_order.order_id }}"}`; default: none.',
    )
    key: str | None = Field(
        default=None, description="Wanted record key (a template); default: any key."
    )

    @field_validator("json_")
    @classmethod
    def _paths_parse(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        for path in value:
            validate_json_path(path)
        return value


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
        source, _, arg = value.partition(":")
        if value in ("trigger", "record") or (source == "step" and arg):
            return value
        raise ValueError(f"latency_from {value!r}: want trigger, step:<name> or record")

    @field_validator("expect")
    @classmethod
    def _no_status(cls, value: Expect) -> Expect:
        if value.status is not None:
            raise ValueError("expect.status does not apply to a Kafka record")
        return value


def expectation_key(step: str) -> tuple[str, str]:
    """Where a step's Expectation lives in `ctx.run_state`."""
    return ("kafka_consume", step)


def channel_of(config: Config) -> str:
    """The correlator channel the shared consumer offers this topic's records on."""
    return f"{config.cluster}/{config.topic}"


class KafkaConsumeProbe:
    """Registers at run start, then waits for, checks and times the run's record."""

    def expect(self, config: Config, ctx: StepContext) -> None:
        """Register with the correlator before any step of the run runs."""
        _register(config, ctx)

    async def run(self, config: Config, ctx: StepContext) -> StepOutcome:
        started = time.monotonic()
        clients = _clients(config, ctx)
        expectation = ctx.run_state.get(expectation_key(ctx.step)) or _register(config, ctx)
        rule = _rendered_rule(config, ctx)
        deadline = min(started + config.within, ctx.deadline - _DEADLINE_MARGIN)
        if config.timeout is not None:
            deadline = min(deadline, started + config.timeout - _DEADLINE_MARGIN)
        try:
            arrival = await expectation.wait(_matcher(*rule), deadline=deadline)
            ctx.note_arrival(arrival)
        except NotReceived as missing:
            raise _why_missing(config, clients, rule, missing) from None
        attributes = _attributes(config, arrival, started)
        latency: float | None = None
        try:
            latency = _latency(config, ctx, arrival, started)
            _in_order(arrival)
            rendered = {k: ctx.render_value(v) for k, v in config.expect.json_.items()}
            check(
                config.expect,
                status=None,
                headers=arrival.headers,
                body=arrival.body,
                latency_s=latency,
                rendered_json=rendered,
            )
            values = extract(config.extract, headers=arrival.headers, body=arrival.body)
            await _no_duplicate(expectation, config.duplicate_window)
        except StepFailed as failed:
            failed.excerpt = failed.excerpt or excerpt(arrival.body)
            failed.latency_s = latency
            failed.attributes.update(attributes)
            raise
        return StepOutcome(latency_s=latency, vars=values, attributes=attributes)


def _clients(config: Config, ctx: StepContext) -> KafkaClients:
    if ctx.kafka is None:
        raise RuntimeError("kafka_consume needs the engine's KafkaClients (kafka: clusters)")
    clients = cast("KafkaClients", ctx.kafka)
    if not clients.watching(config.cluster, config.topic):
        raise RuntimeError(
            f"{config.cluster}/{config.topic} is not watched: the engine must call "
            "KafkaClients.watch_steps(...) with every flow's steps before start()"
        )
    return clients


def _register(config: Config, ctx: StepContext) -> Expectation:
    if ctx.correlator is None:
        raise RuntimeError("kafka_consume needs the engine's correlator")
    expectation: Expectation = ctx.correlator.expect(
        channel_of(config), ctx.run.id, ctx.step, ctx.deadline
    )
    ctx.run_state[expectation_key(ctx.step)] = expectation
    # A step that never runs (skipped after a broken link) must not hold its registration.
    ctx.run_state.setdefault("_on_release", []).append(expectation.cancel)
    return expectation


Rule = tuple[dict[str, str], dict[str, Scalar], bytes | None]


def _rendered_rule(config: Config, ctx: StepContext) -> Rule:
    """The match rule with its templates rendered for this run."""
    if config.match is None:
        return {CORRELATION_HEADER: ctx.run.correlation}, {}, None
    headers = {
        name: ctx.render(v) if isinstance(v, str) else _as_text(v)
        for name, v in config.match.header.items()
    }
    paths: dict[str, Scalar] = {
        path: ctx.render(v) if isinstance(v, str) else v for path, v in config.match.json_.items()
    }
    key = ctx.render(config.match.key).encode() if config.match.key is not None else None
    return headers, paths, key


def _matcher(headers: Mapping[str, str], paths: Mapping[str, Scalar], key: bytes | None) -> Matcher:
    """A total predicate on an Arrival: never raises, so a junk record is just a non-match."""

    def match(arrival: Arrival) -> bool:
        if key is not None and arrival.key != key:
            return False
        if any(arrival.headers.get(name) != want for name, want in headers.items()):
            return False
        if not paths:
            return True
        doc = arrival.json
        if doc is None:
            return False
        return all(
            any(_same(found, want) for found in json_path_get(doc, path))
            for path, want in paths.items()
        )

    return match


def _same(found: Any, want: Scalar) -> bool:
    """Equal, letting a rendered template (always text) stand for a number, bool or null."""
    if isinstance(want, str):
        return found == want if isinstance(found, str) else _as_text(found) == want
    if isinstance(want, bool) or isinstance(found, bool):
        return type(found) is type(want) and found == want
    return bool(found == want)


def _as_text(value: Any) -> str:
    """How a JSON scalar reads in a template: true, 42, null (not Python's True, 42.0, None)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _describe(rule: Rule) -> str:
    headers, paths, key = rule
    parts = [f"key={key.decode('utf-8', 'replace')!r}"] if key is not None else []
    parts += [f"header {k}={v!r}" for k, v in headers.items()]
    parts += [f"{k}={v!r}" for k, v in paths.items()]
    return ", ".join(parts) or "any record"


def _why_missing(
    config: Config, clients: KafkaClients, rule: Rule, missing: NotReceived
) -> StepFailed:
    """not_received, unless the shared consumer could not reach the cluster: then the record
    may well be there, and the link is broken by the connection, not by the service."""
    health = clients.health().get(config.cluster)
    if health is not None and health.consumer in ("down", "starting"):
        return ConnectError(
            f"cannot watch {channel_of(config)}: consumer {health.consumer}"
            f" ({health.last_error or 'no connection yet'})"
        )
    return NotReceived(
        f"no record with {_describe(rule)} within {config.within:g}s: {missing.message}"
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


async def _no_duplicate(expectation: Expectation, window: float) -> None:
    duplicate = await expectation.duplicate(window)
    if duplicate is not None:
        which = f" ({duplicate.delivery_id})" if duplicate.delivery_id else ""
        raise Duplicate(f"a second record matching this run came{which}")


def _latency(config: Config, ctx: StepContext, arrival: Arrival, started: float) -> float:
    """Produce → observe latency: from a step's start (monotonic) or the record's timestamp."""
    if config.latency_from == "record":
        stamped = arrival.meta.get("timestamp_unix")
        if stamped is None:
            raise AssertionFailed("latency_from record: the record has no timestamp")
        # Wall clocks of two machines: a small negative skew is reported as zero.
        return max(0.0, arrival.received_unix - float(stamped))
    _, _, name = config.latency_from.partition(":")
    return max(0.0, arrival.received_at - _step_start(ctx, name or None, started))


def _step_start(ctx: StepContext, name: str | None, fallback: float) -> float:
    """The named step's start, or the previous step's (the trigger), else this step's own."""
    if name is not None:
        if name not in ctx.step_started:
            raise RuntimeError(f"latency_from step:{name}: no step {name} started before")
        return ctx.step_started[name]
    previous: float | None = None
    for step, began in ctx.step_started.items():
        if step == ctx.step:
            break
        previous = began
    return fallback if previous is None else previous


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
