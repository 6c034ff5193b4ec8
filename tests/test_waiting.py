"""What the waiting kinds share (probes/waiting.py): a match rule rendered with its matcher in
one go (`rendered_matcher`, from a shape found once per rule) is the rule and the matcher that
`render_rule` and `Rule.matcher` make, value for value."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytest

from monitor.templates import Templates
from probes import kafka_consume, webhook_await
from probes.arrivals import Arrival
from probes.base import RunInfo, StepContext, Untrusted
from probes.checks import check
from probes.errors import AssertionFailed, ExtractFailed, TemplateError
from probes.selectors import header_value
from probes.waiting import (
    MatchBase,
    RenderMode,
    Rule,
    RuleMatcher,
    assess,
    render_rule,
    rendered_matcher,
)


def context(steps: dict[str, dict[str, Any]] | None = None) -> StepContext:
    return StepContext(
        RunInfo("r1", "hw-r1", "orders", "stable", "x"),
        {"region": "eu"},
        steps or {"create": {"id": "o-7"}},
        Templates(),
        None,  # type: ignore[arg-type]
        "X-Hopwatch-Run",
        "http://127.0.0.1:8080",
        time.monotonic() + 5,
    )


def kafka_header(headers: Mapping[str, str], name: str) -> str | None:
    return headers.get(name)


WEBHOOK_MATCHES = [
    {"json": {"$.ref": "{{ run.correlation }}"}},
    {"header": {"X-Run": "{{ run.id }}", "X-Kind": "paid"}, "json": {"$.order.id": 3}},
    {"json": {"$.id": "{{ steps.create.id }}", "$.region": "{{ variant.region }}", "$.ok": True}},
    {"header": {"X-Count": 2.0}},
    {"json": {"$.items[0].id": "{{ run.correlation }}"}},
    {},
]
KAFKA_MATCHES = [
    {"key": "{{ run.correlation }}", "json": {"$.order_id": "{{ steps.create.id }}"}},
    {"key": "fixed", "header": {"trace": "{{ run.id }}"}},
]
ARRIVALS = [
    {"headers": {"x-run": "r1", "X-Kind": "paid"}, "json": {"ref": "hw-r1", "order": {"id": 3}}},
    {"headers": {"X-Count": "2"}, "json": {"id": "o-7", "region": "eu", "ok": True}},
    {"headers": {}, "json": {"items": [{"id": "hw-r1"}]}, "key": b"hw-r1"},
    {"headers": {"trace": "r1"}, "json": {"order_id": "o-7"}, "key": b"fixed"},
    {"headers": {}, "json": {"ref": "hw-r2"}},
]


def arrival(headers: dict[str, str], json: Any, key: bytes | None = None) -> Arrival:
    return Arrival("kafka", "c", 0.0, 0.0, headers, b"{}", json, None, key)


def same(rule: Rule, matcher: RuleMatcher, want: Rule) -> None:
    made = want.matcher(matcher.header_of)
    assert rule == want
    assert (matcher.keys, matcher.run_keys, matcher.paths) == (made.keys, made.run_keys, made.paths)
    assert matcher.rule is rule and matcher.keys_are_texts is made.keys_are_texts is True
    for shown in ARRIVALS:
        assert matcher(arrival(**shown)) == made(arrival(**shown))


@pytest.mark.parametrize("raw", WEBHOOK_MATCHES)
def test_a_webhook_rule_and_matcher_are_what_rendering_then_matching_make(
    raw: dict[str, Any],
) -> None:
    match = webhook_await.Match.model_validate(raw)
    ctx = context()
    for _ in range(2):  # the shape found, then the shape kept
        rule, matcher = rendered_matcher(match, ctx, "header", header_value)
        same(rule, matcher, render_rule(match, ctx, "header"))


@pytest.mark.parametrize("raw", KAFKA_MATCHES)
def test_a_kafka_rule_and_matcher_with_a_key_are_what_rendering_then_matching_make(
    raw: dict[str, Any],
) -> None:
    match = kafka_consume.Match.model_validate(raw)
    ctx = context()
    for _ in range(2):
        rule, matcher = rendered_matcher(match, ctx, "text", kafka_header, key=match.key)
        same(rule, matcher, render_rule(match, ctx, "text", key=match.key))
    assert matcher.header_of is kafka_header


def test_each_run_gets_its_own_values_from_the_kept_shape() -> None:
    match = webhook_await.Match.model_validate({"json": {"$.ref": "{{ steps.create.id }}"}})
    first, _ = rendered_matcher(match, context({"create": {"id": "a"}}), "header", header_value)
    second, matcher = rendered_matcher(
        match, context({"create": {"id": "b"}}), "header", header_value
    )
    assert (first.paths, second.paths) == ({"$.ref": "a"}, {"$.ref": "b"})
    assert [text for _, text in matcher.keys] == ["b"]


def test_an_xpath_rule_goes_the_general_way() -> None:
    match = webhook_await.Match.model_validate({"xpath": {"//Ref": "{{ run.correlation }}"}})
    rule, matcher = rendered_matcher(match, context(), "header", header_value)
    same(rule, matcher, render_rule(match, context(), "header"))
    assert dict(rule.xpaths) == {"//Ref": "hw-r1"}


@pytest.mark.parametrize("mode", ["header", "text"])
def test_a_template_that_fails_fails_as_rendering_it_does(mode: RenderMode) -> None:
    match: MatchBase = webhook_await.Match.model_validate(
        {"header": {"X-Id": "{{ steps.missing.id }}"}, "json": {"$.a": "{{ steps.gone.x }}"}}
    )
    with pytest.raises(TemplateError) as general:
        render_rule(match, context(), mode)
    with pytest.raises(TemplateError) as shaped:
        rendered_matcher(match, context(), mode, header_value)
    assert str(shaped.value) == str(general.value)


def test_header_values_render_in_the_header_mode() -> None:
    """A value taken from a response with CR/LF is refused in a header, not in a JSON value."""
    steps = {"create": {"id": Untrusted("o-7\r\nX-Evil: 1")}}
    header = webhook_await.Match.model_validate({"header": {"X-Id": "{{ steps.create.id }}"}})
    with pytest.raises(ExtractFailed):
        rendered_matcher(header, context(steps), "header", header_value)
    body = webhook_await.Match.model_validate({"json": {"$.id": "{{ steps.create.id }}"}})
    rule, _ = rendered_matcher(body, context(steps), "header", header_value)
    assert rule.paths == {"$.id": "o-7\r\nX-Evil: 1"}


EXPECTS = [
    {},
    {"max_latency": "2s"},
    {"max_latency": "500ms"},
    {"headers": {"X-Kind": "paid"}},
    {"headers": {"X-Kind": "refunded"}, "max_latency": "2s"},
    {"json": {"$.ref": "{{ run.correlation }}"}},
    {"json": {"$.ref": "other"}},
    {"body": "hw-r1"},
    {"body": "nothing like it"},
    {"namespaces": {"o": "urn:o"}},
]


@pytest.mark.parametrize("raw", EXPECTS)
def test_assess_judges_a_delivery_as_check_does(raw: dict[str, Any]) -> None:
    """An expect that asks at most max_latency is judged by the latency alone (found once per
    expect); any other by `check`, with its templates rendered."""
    config = webhook_await.Config.model_validate(
        {"name": "hook", "kind": "webhook_await", "path": "/h", "within": "5s", "expect": raw}
    )
    delivery = Arrival(
        "webhook", "/h", 0.0, 0.0, {"X-Kind": "paid"}, b'{"ref": "hw-r1"}', {"ref": "hw-r1"}, None
    )
    ctx = context()
    expect = config.expect
    wanted_json = {k: ctx.render(v) for k, v in expect.json_.items()} if expect.json_ else None
    for _ in range(2):  # found, then kept
        try:
            check(
                expect,
                status=None,
                headers=delivery.headers,
                body=delivery.body,
                latency_s=1.0,
                rendered_json=wanted_json,
            )
        except AssertionFailed as failed:
            with pytest.raises(AssertionFailed) as judged:
                assess(config, ctx, delivery, 1.0)
            assert judged.value.message == failed.message
        else:
            assert assess(config, ctx, delivery, 1.0) == {}


def test_what_a_webhook_run_reads_of_its_config_is_the_configs_own() -> None:
    """webhook_await reads a config's fields once (`_read`, positional): each is the field of
    the same name, and a config read again is the same read."""
    from probes.webhook_await import _read

    config = webhook_await.Config.model_validate(
        {
            "name": "hook",
            "kind": "webhook_await",
            "path": "/hooks/x",
            "within": "7s",
            "timeout": "9s",
            "duplicate_window": "3s",
            "latency_from": "json:$.sent",
            "match": {"json": {"$.ref": "{{ run.correlation }}"}},
            "expect": {"max_latency": "5s"},
            "extract": {"id": {"json": "$.id"}},
        }
    )
    read = _read(config)
    for field in read._fields[1:]:
        assert getattr(read, field) is getattr(config, field), field
    assert read.config is config and _read(config) is read
    assert (read.within, read.timeout, read.duplicate_window) == (7.0, 9.0, 3.0)


@pytest.mark.parametrize(
    "rule",
    [
        Rule({"X-Run": "r1"}, {"$.a": 3, "$.b": True}),
        Rule({}, {}, b"k1"),
        Rule({"X-Run": 3}, {}),  # hand-made: a header value that is not text
        Rule({"X-Run": ["r1"]}, {}),  # nor hashable
    ],
)
def test_the_correlator_takes_a_rule_matchers_keys_as_checking_them_would(rule: Rule) -> None:
    """keys_of takes a RuleMatcher's keys without checking each when they are all texts; the
    same keys as checking them gives (none, so the matcher is scanned, when one is not)."""
    from types import SimpleNamespace

    from monitor.correlator.expectation import keys_of

    matcher = rule.matcher(header_value)
    assert keys_of(matcher) == keys_of(SimpleNamespace(keys=matcher.keys))
    if matcher.keys_are_texts:
        assert keys_of(matcher) == matcher.keys != ()
