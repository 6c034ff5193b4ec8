"""The `webhook_await` kind: wait for the webhook a run caused, prove it matches, check and time it.

The step registers its expectation with the correlator when the run starts (`expect`), before
the triggering step runs, so a webhook faster than the trigger's own response is never lost.
When the step runs it renders its match rule (which may use values extracted by earlier steps),
waits for a matching delivery until `within` after the step's start, checks and extracts like
the http kind, and reports the delivery latency: from the triggering step's start, or from a
timestamp the sender wrote into the delivery (`latency_from`).

Signatures are verified by the receiver (monitor/receivers/webhooks.py) before anything is
offered to the correlator, so a forged delivery never reaches a step.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any, Final, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from probes.arrivals import Arrival, CloseMatch
from probes.base import StepConfigBase, StepContext, StepOutcome
from probes.checks import Expect, ExtractRule, json_path_get
from probes.durations import Duration
from probes.errors import AssertionFailed, NotReceived, StepFailed
from probes.kinds import KindSpec, SpanShape, WebhookRoute
from probes.selectors import Scalar, header_value
from probes.signatures import SignatureConfig
from probes.waiting import (
    Rule,
    RuleMatcher,
    XPathMatch,
    annotate,
    assess,
    explain_close,
    latency_from_form,
    no_duplicate,
    no_status,
    own_latency,
    register,
    rendered_matcher,
    since_sent,
    since_step,
    wait_attributes,
    wait_deadline,
)

__all__ = [
    "Config",
    "Match",
    "Respond",
    "Scalar",
    "WebhookAwaitProbe",
    "header_value",
]

KIND: Final = "webhook_await"
_LISTENER: Final = " (the public listener)"  # what offers its arrivals, for `register`'s error
_MS_THRESHOLD: Final = 1e11  # a numeric sender timestamp above this is in milliseconds


class Match(XPathMatch):
    """Which delivery belongs to this run: every given header, JSON value (JSON deliveries) and
    XPath value (XML deliveries: SOAP callbacks) must be equal."""


class Respond(BaseModel):
    """The answer the sender gets for every accepted delivery on this path."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: int = Field(
        default=202,
        ge=200,
        le=599,
        description="Status code; default 202. Senders retry on non-2xx, so a non-2xx answer "
        "makes them retry (useful to exercise their retries, counted as duplicates).",
    )
    body: str | dict[str, Any] | list[Any] | None = Field(
        default=None, description="Body: text, or JSON for a mapping or list; default empty."
    )


class Config(StepConfigBase):
    """Wait for a webhook on the public listener that matches this run."""

    kind: Literal["webhook_await"] = Field(description="Step kind.")
    path: str = Field(
        description="Path under the public listener, e.g. /hooks/fulfilment; required. "
        "Several steps and flows may share a path.",
        pattern=r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$",
    )
    match: Match | None = Field(
        default=None,
        description="How to recognise this run's delivery; default: the synthetic-traffic "
        "marker header (X-Hopwatch-Run unless configured) equal to the run id, which a "
        "service that forwards the marker onto its webhooks provides for free.",
    )
    within: Duration = Field(
        description="How long to wait, from the step's start (a delivery that came while "
        "earlier steps ran is taken at once); required."
    )
    signature: SignatureConfig | None = Field(
        default=None,
        description="How deliveries on this path are signed; default: unsigned, none verified.",
    )
    expect: Expect = Field(
        default_factory=Expect,
        description="Assertions on the delivery (headers, json, body, json_schema, "
        "max_latency on the delivery latency); default: none.",
    )
    extract: dict[str, ExtractRule] = Field(
        default_factory=dict,
        description="Values to take from the delivery for later steps; default: none.",
    )
    respond: Respond = Field(
        default_factory=Respond, description="The answer given to the sender; default 202."
    )
    latency_from: str = Field(
        default="trigger",
        description="Where delivery latency starts: `trigger` (the previous step's start), "
        "`step:<name>` (that step's start), `header:<name>` or `json:<path>` (a sender "
        "timestamp: unix seconds, milliseconds above 1e11, or ISO 8601); default trigger.",
    )
    duplicate_window: Duration = Field(
        default=0.0,
        description="After the delivery came, wait this long and fail with `duplicate` if a "
        "second one came or comes (counts toward the step's time); default 0: no duplicate "
        "check in the step. Duplicates are counted in hopwatch_arrivals_total either way.",
    )

    @field_validator("latency_from")
    @classmethod
    def _latency_from_form(cls, value: str) -> str:
        return latency_from_form(value, ("trigger", "step:<name>", "header:<name>", "json:<path>"))

    @field_validator("expect")
    @classmethod
    def _no_status(cls, value: Expect) -> Expect:
        return no_status(value, "a received webhook")


class WebhookAwaitProbe:
    """Registers at run start, then waits for, checks and times the run's webhook."""

    def expect(self, config: Config, ctx: StepContext) -> None:
        """Register with the correlator before any step of the run runs."""
        register(ctx, KIND, _read(config).path, _LISTENER)

    async def run(self, config: Config, ctx: StepContext) -> StepOutcome:
        started = time.monotonic()
        step = _read(config)
        expectation = register(ctx, KIND, step.path, _LISTENER)  # the run's start made it
        rule, matcher = _rendered_rule(step, ctx)
        what = f"delivery on {step.path} with {rule.describe('any body')}"
        try:  # await_arrival's steps in this coroutine: one coroutine fewer per run
            arrival = await expectation.wait(matcher, deadline=wait_deadline(step, ctx, started))
        except NotReceived as missing:
            # keep what the correlator saw instead: other deliveries, refused ones
            seen = missing.message.partition(" by the deadline")[2]
            raise NotReceived(
                f"no {what} within {step.within:g}s{seen}",
                attributes=wait_attributes(what, None, started),
            ) from None
        except StepFailed as failed:
            if isinstance(failed, CloseMatch):
                explain_close(failed, matcher)
            failed.attributes.update(wait_attributes(what, None, started))
            raise
        ctx.note_arrival(arrival)
        received_at = arrival.received_at
        attributes: dict[str, Any] = {  # with wait_attributes(what, arrival, started)'s, in line
            "webhook.path": step.path,
            "webhook.delivery_id": arrival.delivery_id,
            "webhook.early": received_at < started,
            "wait.for": what,
            "wait.arrived_s": max(0.0, received_at - started),
        }
        window = step.duplicate_window
        if window > 0:
            attributes["wait.duplicate_window_s"] = window
        latency: float | None = None
        try:
            latency = _latency(step, ctx, arrival, started)
            values = assess(step, ctx, arrival, latency)
            # A window of 0 means no duplicate check in the step, not even of one already seen.
            if window > 0:
                await no_duplicate(expectation, window, "delivery", "delivery id ")
        except StepFailed as failed:
            annotate(failed, arrival, latency, attributes)
            raise
        own = own_latency(ctx, arrival)
        # positional, in the fields' order: a class called with keywords costs a dict (3.11)
        return StepOutcome(latency, values, {}, attributes, None, own)


class _Read(NamedTuple):
    """What every run reads of a step's config, read once per config (`_read`): a pydantic
    model's attribute costs ~350 instructions (its class has `__getattr__`, so no fast path),
    a named tuple's ~40, and a run read about a dozen. A `WaitingConfig` for `waiting`."""

    config: Config  # the config itself: an entry is only good for this very object
    path: str
    match: Match | None
    within: float
    timeout: float | None
    duplicate_window: float
    latency_from: str
    expect: Expect
    extract: dict[str, ExtractRule]


_READ: dict[int, _Read] = {}
_READ_MAX: Final = 4096  # reloads make new configs: the old ones are dropped past this


def _read(config: Config) -> _Read:
    known = _READ.get(id(config))
    if known is not None and known.config is config:
        return known
    read = _Read(
        config,
        config.path,
        config.match,
        config.within,
        config.timeout,
        config.duplicate_window,
        config.latency_from,
        config.expect,
        config.extract,
    )
    if len(_READ) >= _READ_MAX:
        _READ.clear()
    _READ[id(config)] = read
    return read


def _rendered_rule(config: _Read, ctx: StepContext) -> tuple[Rule, RuleMatcher]:
    """The match rule with its templates rendered for this run, and its matcher."""
    if config.match is None:
        rule = Rule({ctx.marker_header: ctx.run.id}, {})
        return rule, rule.matcher(header_value)
    return rendered_matcher(config.match, ctx, "header", header_value)


def _latency(config: _Read, ctx: StepContext, arrival: Arrival, started: float) -> float:
    """Delivery latency: from the trigger's start (monotonic) or from a sender timestamp (wall)."""
    source, _, arg = config.latency_from.partition(":")
    if source in ("trigger", "step"):
        return since_step(ctx, arrival, config.latency_from, started)
    if source == "header":
        text = header_value(arrival.headers, arg)
        if text is None:
            raise AssertionFailed(f"latency_from: header {arg} missing")
        return since_sent(arrival, _sender_time(text, config.latency_from))
    found = json_path_get(arrival.json, arg) if arrival.json is not None else []
    if not found:
        raise AssertionFailed(f"latency_from: {arg} missing in the delivery")
    return since_sent(arrival, _sender_time(found[0], config.latency_from))


def _sender_time(value: Any, where: str) -> float:
    """Unix seconds from a sender timestamp: seconds, milliseconds (> 1e11) or ISO 8601."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return _iso_time(value, where)
    else:
        raise AssertionFailed(f"latency_from {where}: {value!r} is not a timestamp")
    if not math.isfinite(number):
        raise AssertionFailed(f"latency_from {where}: {value!r} is not a timestamp")
    return number / 1000.0 if number > _MS_THRESHOLD else number


def _iso_time(text: str, where: str) -> float:
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise AssertionFailed(f"latency_from {where}: {text[:40]!r} is not a timestamp") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _span(config: Config, ctx: StepContext) -> SpanShape:
    return SpanShape(f"process {config.path}", "consumer", {"url.path": config.path})


def _route(config: Config) -> WebhookRoute:
    return WebhookRoute(
        path=config.path,
        signature=config.signature,
        respond_status=config.respond.status,
        respond_body=config.respond.body,
        step=config.name,
    )


_PROBE = WebhookAwaitProbe()
SPEC = KindSpec(Config, _PROBE, span=_span, expect=_PROBE.expect, listens=_route)
