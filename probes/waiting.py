"""What the waiting kinds (webhook_await, kafka_consume) share, so each of their rules lives once.

Both register an expectation with the correlator when the run starts, render a match rule
(whose matcher names its equalities, so the correlator finds it by index), wait for a matching
arrival until `within` after the step's start, time it from a step's start or a sender's
clock, then check, extract and look for duplicates the same way. A kind keeps only what
differs: where arrivals come from, its default rule, and how a sender stamps them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Annotated, Any, Final, NamedTuple, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from probes.arrivals import Arrival, CloseMatch, Matcher, Registration, Selector
from probes.base import RenderMode, StepContext
from probes.checks import (
    JSON_PATH_KEYS,
    Expect,
    ExtractRule,
    PathReader,
    as_text,
    check,
    check_latency,
    excerpt,
    extract,
    json_path_get,
    rendered_json,
    rendered_xpath,
    same_value,
    validate_json_path,
)
from probes.errors import Duplicate, StepFailed
from probes.selectors import (
    _KEY,
    HeaderLookup,
    Scalar,
    _header,
    _holds,
    _json_path,
    _key_text,
    _reader,
    _xpath,
    _xpath_values,
    wanted_text,
)
from probes.xml_checks import validate_xpath

# Stop waiting this much before the run's own deadline so the step fails with what happened
# (not_received) rather than with the runner's generic timeout.
_DEADLINE_MARGIN: Final = 0.01


class WaitingConfig(Protocol):
    """The fields every waiting kind's Config has (read-only: configs are frozen)."""

    @property
    def within(self) -> float: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def expect(self) -> Expect: ...
    @property
    def extract(self) -> Mapping[str, ExtractRule]: ...
    @property
    def latency_from(self) -> str: ...


class MatchBase(BaseModel):
    """Header and JSON values an arrival must have to belong to this run; a kind adds its own."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    header: dict[str, Scalar] = Field(
        default_factory=dict,
        description="Header name → wanted value (a template); default: none.",
    )
    json_: Annotated[dict[str, Scalar], JSON_PATH_KEYS] = Field(
        default_factory=dict,
        alias="json",
        description="JSON path → wanted value (a template), e.g. "
        '`{"$.order_id": "{{ steps.create_order.order_id }}"}`; default: none.',
    )


class XPathMatch(MatchBase):
    """A match rule that may also read XML arrivals (webhooks): by XPath, with namespaces."""

    xpath: dict[str, Scalar] = Field(
        default_factory=dict,
        description="XPath → wanted value (a template) in an XML delivery (an element stands "
        "for its text), e.g. `{//o:Ref: '{{ run.correlation }}'}`; default: none.",
    )
    namespaces: dict[str, str] = Field(
        default_factory=dict,
        description="XML namespace prefixes the match's XPaths use, prefix → URI; default: none.",
    )

    @model_validator(mode="after")
    def _xpaths_compile(self) -> XPathMatch:
        for path in self.xpath:
            validate_xpath(path, self.namespaces)
        return self


_NO_VALUES: Final[Mapping[str, Scalar]] = MappingProxyType({})


class Rule(NamedTuple):
    """A match rule with its templates rendered for this run. A named tuple: as immutable as a
    frozen dataclass, made without an `object.__setattr__` per field (~2.5x cheaper; a waiting
    step makes one per run)."""

    headers: dict[str, str]
    paths: dict[str, Scalar]
    key: bytes | None = None
    # which parts hold the run's own values (rendered from templates): "key", "header:<name>",
    # "json:<path>", "xpath:<path>"; an arrival that carries one of them belongs to this run
    run_parts: frozenset[str] = frozenset()
    # XPath → wanted value in an XML arrival (`Arrival.xml`), with the prefixes they use
    xpaths: Mapping[str, Scalar] = _NO_VALUES
    namespaces: tuple[tuple[str, str], ...] = ()

    def matcher(self, header_of: HeaderLookup) -> RuleMatcher:
        """A total predicate on an Arrival (never raises, so a junk arrival is just a
        non-match) that names its equalities for the correlator's index."""
        return RuleMatcher(self, header_of)

    def describe(self, anything: str) -> str:
        """The rule as a failure message shows it; `anything` when it asks for nothing."""
        parts = [f"key={self.key.decode('utf-8', 'replace')!r}"] if self.key is not None else []
        # loops, not comprehensions (a call each), entered only when there is something
        if self.headers:
            for k, v in self.headers.items():
                parts.append(f"header {k}={v!r}")
        if self.paths:
            for path, want in self.paths.items():
                parts.append(f"{path}={want!r}")
        if self.xpaths:
            for xpath, wanted in self.xpaths.items():
                parts.append(f"{xpath}={wanted!r}")
        return ", ".join(parts) or anything

    def mismatch(self, arrival: Arrival, header_of: HeaderLookup) -> str:
        """What of the rule `arrival` fails, with what it holds instead."""
        parts: list[str] = []
        if self.key is not None and arrival.key != self.key:
            found = "none" if arrival.key is None else repr(arrival.key.decode("utf-8", "replace"))
            parts.append(f"key {found}, want {self.key.decode('utf-8', 'replace')!r}")
        for name, want in self.headers.items():
            value = header_of(arrival.headers, name)
            if value != want:
                seen = "missing" if value is None else repr(value)
                parts.append(f"header {name} {seen}, want {want!r}")
        for path, wanted in self.paths.items():
            values = json_path_get(arrival.json, path) if arrival.json is not None else []
            if not any(same_value(v, wanted) for v in values):
                held = ", ".join(repr(v) for v in values[:3]) or "missing"
                parts.append(f"{path} {held}, want {wanted!r}")
        for path, wanted in self.xpaths.items():
            values = _xpath_values(arrival, path, self.namespaces)
            if not any(same_value(v, wanted) for v in values):
                held = ", ".join(repr(v) for v in values[:3]) or "missing"
                parts.append(f"{path} {held}, want {wanted!r}")
        return "; ".join(parts)


class RuleMatcher:
    """Whether an arrival has a rule's key, headers (read with `header_of`) and JSON values;
    its equalities are its `keys` (probes.arrivals.IndexedMatcher): every arrival it
    accepts holds each key's text at that key's selector."""

    __slots__ = ("header_of", "keys", "keys_are_texts", "paths", "rule", "run_keys")

    def __init__(self, rule: Rule, header_of: HeaderLookup) -> None:
        self.rule = rule
        self.header_of = header_of
        self.paths = tuple((_reader(path), want) for path, want in rule.paths.items())
        keys: list[tuple[Selector, str]] = []
        run = rule.run_parts
        run_keys: list[tuple[Selector, str]] = []
        if rule.key is not None:
            keys.append((_KEY, _key_text(rule.key)))
            if "key" in run:
                run_keys.append(keys[-1])
        for name, want in rule.headers.items():
            keys.append((_header(name, header_of), want))
            if f"header:{name}" in run:
                run_keys.append(keys[-1])
        for path, wanted in rule.paths.items():
            keys.append((_json_path(path), wanted_text(wanted)))
            if f"json:{path}" in run:
                run_keys.append(keys[-1])
        for path, wanted in rule.xpaths.items():
            keys.append((_xpath(path, rule.namespaces), wanted_text(wanted)))
            if f"xpath:{path}" in run:
                run_keys.append(keys[-1])
        self.keys = tuple(keys)
        self.run_keys = tuple(run_keys)
        # every key's text a str (a hand-made Rule may hold other header values): the
        # correlator then indexes the keys as they are, without checking each (keys_of)
        self.keys_are_texts = True
        for _, text in keys:
            if type(text) is not str:
                self.keys_are_texts = False

    def __call__(self, arrival: Arrival) -> bool:
        # Loops, not any()/all() over generators: the correlator confirms every candidate
        # it finds by index with this, once per arrival.
        rule = self.rule
        if rule.key is not None and arrival.key != rule.key:
            return False
        if rule.headers:
            header_of = self.header_of
            for name, text in rule.headers.items():
                if header_of(arrival.headers, name) != text:
                    return False
        if self.paths:
            doc = arrival.json
            if doc is None:
                return False
            for read, wanted in self.paths:
                if not _holds(read(doc), wanted):
                    return False
        if rule.xpaths:
            spaces = rule.namespaces
            for path, value in rule.xpaths.items():
                if not _holds(_xpath_values(arrival, path, spaces), value):
                    return False
        return True


def render_rule(
    match: MatchBase, ctx: StepContext, header_mode: RenderMode, key: str | None = None
) -> Rule:
    """`match` with its templates rendered for this run; non-text values read as in a template."""
    # each dict made only when the rule has such values (a comprehension is a call)
    headers = (
        {
            name: ctx.render(v, header_mode) if isinstance(v, str) else as_text(v)
            for name, v in match.header.items()
        }
        if match.header
        else {}
    )
    paths: dict[str, Scalar] = (
        {path: ctx.render(v) if isinstance(v, str) else v for path, v in match.json_.items()}
        if match.json_
        else {}
    )
    run_parts = _run_parts(match, key)
    rendered_key = ctx.render(key).encode() if key is not None else None
    if not isinstance(match, XPathMatch) or not match.xpath:
        return Rule(headers, paths, rendered_key, run_parts)
    xpaths: dict[str, Scalar] = {
        path: ctx.render(v) if isinstance(v, str) else v for path, v in match.xpath.items()
    }
    spaces = tuple(sorted(match.namespaces.items()))
    return Rule(headers, paths, rendered_key, run_parts, xpaths, spaces)


# match rule's identity → (the rule, its key template, which parts hold the run's own values)
_RUN_PARTS: dict[int, tuple[MatchBase, str | None, frozenset[str]]] = {}


def _run_parts(match: MatchBase, key: str | None) -> frozenset[str]:
    """Which parts of `match` (and `key`) hold the run's own values (`Rule.run_parts`): found
    once per rule, as configs are frozen (a regex per value per run was a tenth of a webhook
    run's own cost)."""
    known = _RUN_PARTS.get(id(match))
    if known is not None and known[0] is match and known[1] == key:
        return known[2]
    parts = {f"header:{n}" for n, v in match.header.items() if _templated(v)}
    parts |= {f"json:{p}" for p, v in match.json_.items() if _templated(v)}
    if key is not None and _templated(key):
        parts.add("key")
    if isinstance(match, XPathMatch):
        parts |= {f"xpath:{p}" for p, v in match.xpath.items() if _templated(v)}
    if len(_RUN_PARTS) >= _RUN_PARTS_MAX:  # reloads make new rules: drop the old ones
        _RUN_PARTS.clear()
    found = frozenset(parts)
    _RUN_PARTS[id(match)] = (match, key, found)
    return found


_RUN_PARTS_MAX: Final = 4096
_RUN_VALUE = re.compile(r"\{\{[^}]*\b(?:run\.(?:id|correlation)\b|steps\.)")


def _templated(value: Scalar) -> bool:
    """Whether a rule's value is this run's own: a template reading `run.id`,
    `run.correlation` or `steps.*` (the flow's, a variant's or the monitor's values are shared
    by every run)."""
    return isinstance(value, str) and _RUN_VALUE.search(value) is not None


def rendered_matcher(
    match: MatchBase,
    ctx: StepContext,
    header_mode: RenderMode,
    header_of: HeaderLookup,
    key: str | None = None,
) -> tuple[Rule, RuleMatcher]:
    """`render_rule(match, ctx, header_mode, key)` and its `matcher(header_of)`, the same
    values rendered in the same order, with what every run of `match` shares (which values
    are templates, the parts' selectors and readers, which parts hold the run's own values)
    worked out once per rule (`_Shape`): the two one after the other were ~3.5 µs of a
    waiting step, half of it finding the same selectors and readers again. A rule with XPaths
    goes the general way."""
    shape = _shape(match, header_mode, header_of, key)
    if shape is None:
        rule = render_rule(match, ctx, header_mode, key)
        return rule, rule.matcher(header_of)
    # rendered in render_rule's order (headers, paths, key), keyed in RuleMatcher's (key first)
    headers: dict[str, str] = {}
    keys: list[tuple[Selector, str]] = []
    run_keys: list[tuple[Selector, str]] = []
    for name, value, text, selector, is_run in shape.headers:
        text = ctx.render(value, header_mode) if isinstance(value, str) else text
        headers[name] = text
        keys.append(part := (selector, text))
        if is_run:
            run_keys.append(part)
    paths: dict[str, Scalar] = {}
    readers = []
    for path, value, text, (selector, reader), is_run in shape.paths:
        wanted = ctx.render(value) if isinstance(value, str) else value
        paths[path] = wanted
        readers.append((reader, wanted))
        keys.append(part := (selector, wanted if isinstance(wanted, str) else text))
        if is_run:
            run_keys.append(part)
    rendered_key = None
    if key is not None:
        rendered_key = ctx.render(key).encode()
        keys.insert(0, part := (_KEY, _key_text(rendered_key)))
        if shape.key_is_run:
            run_keys.insert(0, part)
    rule = Rule(headers, paths, rendered_key, shape.run_parts)
    matcher: RuleMatcher = _new_object(RuleMatcher)  # what RuleMatcher.__init__ would make
    matcher.rule, matcher.header_of, matcher.paths = rule, header_of, tuple(readers)
    matcher.keys, matcher.run_keys = tuple(keys), tuple(run_keys)
    matcher.keys_are_texts = True  # rendered, as_text, wanted_text, _key_text: all str
    return rule, matcher


_new_object = object.__new__
# a header's (name, value, its text when not a str to render, selector, a run part?)
_HeaderPart = tuple[str, Scalar, str, Selector, bool]
# a JSON path's (path, value, its wanted text when not a str to render, (selector, reader),
# a run part?)
_PathPart = tuple[str, Scalar, str, tuple[Selector, PathReader], bool]


class _Shape(NamedTuple):
    """What `rendered_matcher` finds once per (match rule, header mode, header lookup, key)."""

    match: MatchBase  # the rule itself: a cache entry is only good for this very object
    headers: tuple[_HeaderPart, ...]
    paths: tuple[_PathPart, ...]
    run_parts: frozenset[str]
    key_is_run: bool


_SHAPES: dict[tuple[int, str, HeaderLookup, str | None], _Shape] = {}


def _shape(
    match: MatchBase, header_mode: str, header_of: HeaderLookup, key: str | None
) -> _Shape | None:
    """`match`'s shape, found once (configs are frozen); None for a rule with XPaths."""
    cache_key = (id(match), header_mode, header_of, key)
    known = _SHAPES.get(cache_key)
    if known is not None and known.match is match:
        return known
    if isinstance(match, XPathMatch) and match.xpath:
        return None
    run = _run_parts(match, key)
    headers: tuple[_HeaderPart, ...] = tuple(
        (
            name,
            value,
            "" if isinstance(value, str) else as_text(value),
            _header(name, header_of),
            f"header:{name}" in run,
        )
        for name, value in match.header.items()
    )
    paths: tuple[_PathPart, ...] = tuple(
        (
            path,
            value,
            "" if isinstance(value, str) else wanted_text(value),
            (_json_path(path), _reader(path)),
            f"json:{path}" in run,
        )
        for path, value in match.json_.items()
    )
    shape = _Shape(match, headers, paths, run, "key" in run)
    if len(_SHAPES) >= _RUN_PARTS_MAX:  # reloads make new rules: drop the old ones
        _SHAPES.clear()
    _SHAPES[cache_key] = shape
    return shape


def expectation_key(kind: str, step: str) -> tuple[str, str]:
    """Where a step's Registration lives in `ctx.run_state`."""
    return (kind, step)


def register(ctx: StepContext, kind: str, channel: str, listener: str = "") -> Registration:
    """The step's registration with the correlator, made now unless the run's start made it.
    `listener` names what offers arrivals, for the error when the engine lent no correlator."""
    key = (kind, ctx.step)  # expectation_key(kind, ctx.step), written out: twice a run
    registered: Registration | None = ctx.run_state.get(key)
    if registered is not None:
        return registered
    if ctx.correlator is None:
        raise RuntimeError(f"{kind} needs the engine's correlator{listener}")
    made = ctx.correlator.expect(channel, ctx.run.id, ctx.step, ctx.deadline)
    ctx.run_state[key] = made
    # A step that never runs (skipped after a broken link) must not hold its registration.
    ctx.run_state.setdefault("_on_release", []).append(made.cancel)
    return made


async def await_arrival(
    config: WaitingConfig,
    ctx: StepContext,
    expectation: Registration,
    matcher: Matcher,
    started: float,
) -> Arrival:
    """The matching arrival, waited for until `within` after the step's start (capped by the
    step's timeout and the run's deadline); raises NotReceived. (`webhook_await` does the
    same in its own coroutine: `wait_deadline`, `explain_close`, `ctx.note_arrival`.)"""
    try:
        arrival = await expectation.wait(matcher, deadline=wait_deadline(config, ctx, started))
    except CloseMatch as close:
        explain_close(close, matcher)
        raise
    ctx.note_arrival(arrival)
    return arrival


def wait_deadline(config: WaitingConfig, ctx: StepContext, started: float) -> float:
    """When a wait that started at `started` gives up: `within` after it, capped by the
    step's timeout and the run's deadline (less a margin, so the step says what happened)."""
    deadline = min(started + config.within, ctx.deadline - _DEADLINE_MARGIN)
    timeout = config.timeout
    if timeout is not None:
        deadline = min(deadline, started + timeout - _DEADLINE_MARGIN)
    return deadline


def explain_close(close: CloseMatch, matcher: Matcher) -> None:
    """This run's arrival came and the rule refused it: say what differed (assertion)."""
    if isinstance(matcher, RuleMatcher):
        wrong = matcher.rule.mismatch(close.arrival, matcher.header_of)
        close.message = f"{close.message}: {wrong}" if wrong else close.message
    close.excerpt = close.excerpt or excerpt(close.arrival.body)


def assess(
    config: WaitingConfig, ctx: StepContext, arrival: Arrival, latency: float | None
) -> dict[str, Any]:
    """Check the arrival against `expect` (templates rendered for this run); return `extract`'s
    values."""
    expect = config.expect
    if _latency_only(expect):  # the usual wait: what `check` would do of it
        check_latency(expect.max_latency, latency)
    else:
        check(  # nothing to render when nothing is asked: None reads expect's own
            expect,
            status=None,
            headers=arrival.headers,
            body=arrival.body,
            latency_s=latency,
            rendered_json=rendered_json(expect, ctx) if expect.json_ else None,
            rendered_xpath=rendered_xpath(expect, ctx) if expect.xpath else None,
        )
    if not config.extract:
        return {}
    return extract(config.extract, headers=arrival.headers, body=arrival.body)


# expect's identity → (expect, whether it asks nothing but `max_latency`)
_LATENCY_ONLY: dict[int, tuple[Expect, bool]] = {}
_NO_LATENCY: Final = {"max_latency"}


def _latency_only(expect: Expect) -> bool:
    """Whether `expect` asks nothing but (at most) `max_latency`, found once per (frozen)
    `expect`: `check` then only compares the latency, where it reads ~10 of expect's fields
    (pydantic attributes) to find nothing else to do."""
    known = _LATENCY_ONLY.get(id(expect))
    if known is not None and known[0] is expect:
        return known[1]
    only = expect.model_dump(exclude=_NO_LATENCY) == _DEFAULT_EXPECT
    if len(_LATENCY_ONLY) >= _RUN_PARTS_MAX:  # reloads make new configs: drop the old ones
        _LATENCY_ONLY.clear()
    _LATENCY_ONLY[id(expect)] = (expect, only)
    return only


_DEFAULT_EXPECT: Final = Expect().model_dump(exclude=_NO_LATENCY)


def annotate(
    failed: StepFailed, arrival: Arrival, latency: float | None, attributes: Mapping[str, Any]
) -> None:
    """Attach the arrival's body excerpt, the latency and the attributes to a failure found
    after it came."""
    failed.excerpt = failed.excerpt or excerpt(arrival.body)
    failed.latency_s = latency
    failed.attributes.update(attributes)


async def no_duplicate(expectation: Registration, window: float, what: str, id_label: str) -> None:
    """Fail with `duplicate` if a second arrival matching this run came or comes in `window`."""
    duplicate = await expectation.duplicate(window)
    if duplicate is not None:
        which = f" ({id_label}{duplicate.delivery_id})" if duplicate.delivery_id else ""
        raise Duplicate(f"a second {what} matching this run came{which}")


def no_status(expect: Expect, what: str) -> Expect:
    """Refuse `expect.status` on an arrival, which has no status (`what`: what arrives)."""
    if expect.status is not None:
        raise ValueError(f"expect.status does not apply to {what}")
    return expect


def latency_from_form(value: str, forms: Sequence[str]) -> str:
    """Accept a `latency_from` of one of `forms`: a bare word (`trigger`) or a source with a
    non-empty argument (`step:<name>`); a `json:` argument must be a JSON path."""
    source, _, arg = value.partition(":")
    for form in forms:
        wanted, takes_arg, _ = form.partition(":")
        if takes_arg and source == wanted and arg:
            if source == "json":
                validate_json_path(arg)
            return value
        if not takes_arg and value == wanted:
            return value
    raise ValueError(f"latency_from {value!r}: want {', '.join(forms[:-1])} or {forms[-1]}")


def since_step(ctx: StepContext, arrival: Arrival, latency_from: str, started: float) -> float:
    """Latency (monotonic) from the start of the step `latency_from` names: `step:<name>`,
    else the trigger (`trigger`: the previous step, or this step when it is the first)."""
    _, _, name = latency_from.partition(":")
    return max(0.0, arrival.received_at - _step_start(ctx, name or None, started))


def own_latency(ctx: StepContext, arrival: Arrival) -> float | None:
    """The hop's own part of its latency: from the end of the step before it (what the wait
    depended on last) to the arrival; 0 when the arrival came before that step ended; None for
    a first step (its latency is all its own)."""
    previous: float | None = None
    for step, ended in ctx.step_ended.items():
        if step == ctx.step:
            break
        previous = ended
    return None if previous is None else max(0.0, arrival.received_at - previous)


def wait_attributes(what: str, arrival: Arrival | None, started: float) -> dict[str, Any]:
    """What a wait was for, and when its arrival came from the step's start (for the run's
    waterfall): `wait.for`, `wait.arrived_s`."""
    attributes: dict[str, Any] = {"wait.for": what}
    if arrival is not None:
        attributes["wait.arrived_s"] = max(0.0, arrival.received_at - started)
    return attributes


def since_sent(arrival: Arrival, sent_unix: float) -> float:
    """Latency (wall clock) from a time the sender or broker stamped on the arrival."""
    # Wall clocks of two machines: a small negative skew is reported as zero, not as a failure.
    return max(0.0, float(arrival.received_unix) - sent_unix)


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
