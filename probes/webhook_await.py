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
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

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
from probes.errors import AssertionFailed, Duplicate, NotReceived, StepFailed
from probes.signatures import SignatureConfig

# Stop waiting this much before the run's own deadline so the step fails with what happened
# (not_received) rather than with the runner's generic timeout.
_DEADLINE_MARGIN: Final = 0.01
_MS_THRESHOLD: Final = 1e11  # a numeric sender timestamp above this is in milliseconds

if TYPE_CHECKING:  # types only: at run time the engine lends the correlator through ctx
    from monitor.correlator import Arrival, Expectation, Matcher

Scalar = str | int | float | bool


class Match(BaseModel):
    """Which delivery belongs to this run: every given header and JSON value must be equal."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    header: dict[str, Scalar] = Field(
        default_factory=dict,
        description="Header name → wanted value (a template); default: none.",
    )
    json_: dict[str, Scalar] = Field(
        default_factory=dict,
        alias="json",
        description="JSON path → wanted value (a template), e.g. "
        '`{"$.order_id": "{{ steps.create_order.order_id }}"}`; default: none.',
    )

    @field_validator("json_")
    @classmethod
    def _paths_parse(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        for path in value:
            validate_json_path(path)
        return value


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
        source, _, arg = value.partition(":")
        if value == "trigger" or (source in ("step", "header") and arg):
            return value
        if source == "json" and arg:
            validate_json_path(arg)
            return value
        raise ValueError(
            f"latency_from {value!r}: want trigger, step:<name>, header:<name> or json:<path>"
        )

    @field_validator("expect")
    @classmethod
    def _no_status(cls, value: Expect) -> Expect:
        if value.status is not None:
            raise ValueError("expect.status does not apply to a received webhook")
        return value


def expectation_key(step: str) -> tuple[str, str]:
    """Where a step's Expectation lives in `ctx.run_state`."""
    return ("webhook_await", step)


class WebhookAwaitProbe:
    """Registers at run start, then waits for, checks and times the run's webhook."""

    def expect(self, config: Config, ctx: StepContext) -> None:
        """Register with the correlator before any step of the run runs."""
        _register(config, ctx)

    async def run(self, config: Config, ctx: StepContext) -> StepOutcome:
        started = time.monotonic()
        expectation = ctx.run_state.get(expectation_key(ctx.step)) or _register(config, ctx)
        headers, paths = _rendered_rule(config, ctx)
        deadline = min(started + config.within, ctx.deadline - _DEADLINE_MARGIN)
        if config.timeout is not None:
            deadline = min(deadline, started + config.timeout - _DEADLINE_MARGIN)
        try:
            arrival = await expectation.wait(_matcher(headers, paths), deadline=deadline)
            ctx.note_arrival(arrival)
        except NotReceived:
            rule = _describe(headers, paths)
            raise NotReceived(
                f"no delivery on {config.path} with {rule} within {config.within:g}s"
            ) from None
        attributes: dict[str, Any] = {
            "webhook.path": config.path,
            "webhook.delivery_id": arrival.delivery_id,
            "webhook.early": arrival.received_at < started,
        }
        latency: float | None = None
        try:
            latency = _latency(config, ctx, arrival, started)
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
            if config.duplicate_window > 0:
                await _no_duplicate(expectation, config.duplicate_window)
        except StepFailed as failed:
            failed.excerpt = failed.excerpt or excerpt(arrival.body)
            failed.latency_s = latency
            failed.attributes.update(attributes)
            raise
        return StepOutcome(latency_s=latency, vars=values, attributes=attributes)


def _register(config: Config, ctx: StepContext) -> Expectation:
    if ctx.correlator is None:
        raise RuntimeError("webhook_await needs the engine's correlator (the public listener)")
    expectation: Expectation = ctx.correlator.expect(
        config.path, ctx.run.id, ctx.step, ctx.deadline
    )
    ctx.run_state[expectation_key(ctx.step)] = expectation
    # A step that never runs (skipped after a broken link) must not hold its registration.
    ctx.run_state.setdefault("_on_release", []).append(expectation.cancel)
    return expectation


async def _no_duplicate(expectation: Expectation, window: float) -> None:
    duplicate = await expectation.duplicate(window)
    if duplicate is not None:
        which = f" (delivery id {duplicate.delivery_id})" if duplicate.delivery_id else ""
        raise Duplicate(f"a second delivery matching this run came{which}")


def _rendered_rule(config: Config, ctx: StepContext) -> tuple[dict[str, str], dict[str, Scalar]]:
    """The match rule with its templates rendered for this run."""
    if config.match is None:
        return {ctx.marker_header: ctx.run.id}, {}
    headers = {
        name: ctx.render(v, "header") if isinstance(v, str) else _as_text(v)
        for name, v in config.match.header.items()
    }
    paths: dict[str, Scalar] = {
        path: ctx.render(v) if isinstance(v, str) else v for path, v in config.match.json_.items()
    }
    return headers, paths


def _matcher(headers: Mapping[str, str], paths: Mapping[str, Scalar]) -> Matcher:
    """A total predicate on an Arrival: never raises, so a junk delivery is just a non-match."""

    def match(arrival: Arrival) -> bool:
        for name, want in headers.items():
            if header_value(arrival.headers, name) != want:
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


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, case-insensitively, from an aiohttp CIMultiDict or a plain mapping."""
    value = headers.get(name)
    if value is not None:
        return value
    lower = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lower:
            return candidate
    return None


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


def _describe(headers: Mapping[str, str], paths: Mapping[str, Scalar]) -> str:
    parts = [f"header {k}={v!r}" for k, v in headers.items()]
    parts += [f"{k}={v!r}" for k, v in paths.items()]
    return ", ".join(parts) or "any body"


def _latency(config: Config, ctx: StepContext, arrival: Arrival, started: float) -> float:
    """Delivery latency: from the trigger's start (monotonic) or from a sender timestamp (wall)."""
    source, _, arg = config.latency_from.partition(":")
    if source in ("trigger", "step"):
        origin = _step_start(ctx, arg or None, started)
        return max(0.0, arrival.received_at - origin)
    if source == "header":
        text = header_value(arrival.headers, arg)
        if text is None:
            raise AssertionFailed(f"latency_from: header {arg} missing")
        sent = _sender_time(text, config.latency_from)
    else:
        found = json_path_get(arrival.json, arg) if arrival.json is not None else []
        if not found:
            raise AssertionFailed(f"latency_from: {arg} missing in the delivery")
        sent = _sender_time(found[0], config.latency_from)
    # Wall clocks of two machines: a small negative skew is reported as zero, not as a failure.
    return max(0.0, float(arrival.received_unix) - sent)


def _step_start(ctx: StepContext, name: str | None, fallback: float) -> float:
    """The named step's start, or the previous step's (the trigger), else this step's own."""
    if name is not None:
        if name not in ctx.step_started:
            raise RuntimeError(f"latency_from step:{name}: no step {name} started before")
        return ctx.step_started[name]
    previous: float | None = None
    for step, started in ctx.step_started.items():
        if step == ctx.step:
            break
        previous = started
    return fallback if previous is None else previous


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
