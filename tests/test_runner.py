"""The runner builds a run's context and results with positional arguments (a class called with
keywords costs CPython 3.11 a dict per call): every field must land where it belongs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest
from pydantic import Field

from monitor.config import Config
from monitor.results import RunResult
from monitor.runner import Runner, RunnerDeps
from monitor.sinks import FanOut
from monitor.templates import Templates
from probes import KINDS
from probes.base import StepConfigBase, StepContext, StepOutcome
from probes.kinds import KindSpec


class LookConfig(StepConfigBase):
    """Remember the context the step ran with; hand on `value`."""

    kind: Literal["look"] = Field(description="Step kind.")
    value: str = Field(default="", description="A template, handed on as `steps.<name>.said`.")


class LookProbe:
    def __init__(self) -> None:
        self.seen: list[tuple[str, StepContext, dict[str, Any]]] = []

    async def run(self, config: LookConfig, ctx: StepContext) -> StepOutcome:
        self.seen.append((ctx.step, ctx, dict(ctx.variables())))
        return StepOutcome(0.25, {"said": ctx.render(config.value)}, {}, {"a": 1}, 99.0, 0.125)


@pytest.fixture
def look() -> Iterator[LookProbe]:
    probe = LookProbe()
    # as if it sent one request through the shared pool: a one-step run then has one_request
    KINDS.register(KindSpec(LookConfig, probe, tls=lambda config: None, one_request=True))
    yield probe
    KINDS.unregister("look")


FLOW = """
flows:
  - name: looks
    timeout: 20s
    location: lab
    reuse_connections: true
    variants:
      blue: {base_url: "http://blue", colour: navy}
    steps:
      - {name: first, kind: look, value: "{{ run.flow }}/{{ variant.colour }}"}
      - {name: second, kind: look, value: "{{ steps.first.said }}"}
    cleanup:
      - {name: tidy, kind: look}
  - name: once
    cookies: true
    steps:
      - {name: only, kind: look}
"""


class Kept:
    def __init__(self) -> None:
        self.results: list[RunResult] = []

    def submit(self, result: RunResult) -> None:
        self.results.append(result)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_a_runs_context_and_results_carry_every_field_where_it_belongs(
    look: LookProbe, load_flows: Callable[[str], Config]
) -> None:
    flow, once = load_flows(FLOW).flows
    kept = Kept()
    http, correlator, kafka, shared = object(), object(), object(), {"look": object()}
    deps = RunnerDeps(
        templates=Templates(),
        http=http,  # type: ignore[arg-type]
        sinks=FanOut([kept]),
        location="here",
        marker_header="X-Mark",
        public_url="http://public:1",
        correlator=correlator,  # type: ignore[arg-type]
        kafka=kafka,  # type: ignore[arg-type]
        replica="r2",
        shared=shared,  # type: ignore[arg-type]
    )
    result = await Runner(deps).run(flow, "blue")

    assert [step for step, _, _ in look.seen] == ["first", "second", "tidy"]
    _, ctx, variables = look.seen[0]
    assert (ctx.run.flow, ctx.run.variant, ctx.run.location) == ("looks", "blue", "lab")
    assert ctx.run.correlation == f"hw-{ctx.run.id}"
    assert ctx.variant == {"base_url": "http://blue", "headers": {}, "colour": "navy"}
    assert (ctx.renderer, ctx.http, ctx.correlator, ctx.kafka) == (
        deps.templates,
        http,
        correlator,
        kafka,
    )
    assert (ctx.marker_header, ctx.public_url, ctx.shared) == ("X-Mark", "http://public:1", shared)
    assert (ctx.reuse_connections, ctx.cookies, ctx.one_request) == (True, False, False)
    assert ctx.propagation() == {}
    assert 19.0 < ctx.deadline - ctx.step_started["first"] <= 20.0
    assert variables["run"]["correlation"] == ctx.run.correlation
    assert ctx.steps == {
        "first": {"said": "looks/navy"},
        "second": {"said": "looks/navy"},
        "tidy": {"said": ""},
    }

    assert kept.results == [result]
    assert (result.run_id, result.correlation) == (ctx.run.id, ctx.run.correlation)
    assert (result.flow, result.variant, result.location) == ("looks", "blue", "lab")
    assert (result.outcome, result.trace_id, result.replica, result.maintenance) == (
        "success",
        None,
        "r2",
        False,
    )
    assert 0.0 <= result.duration_s < 5.0
    first, second, tidy = result.steps
    assert [(s.name, s.kind, s.status, s.cleanup) for s in result.steps] == [
        ("first", "look", "passed", False),
        ("second", "look", "passed", False),
        ("tidy", "look", "passed", True),
    ]
    for step in result.steps:
        assert step.started_at == pytest.approx(result.started_at + step.offset_s)
        assert (step.latency_s, step.own_latency_s, step.tls_not_after) == (0.25, 0.125, 99.0)
        assert (step.attributes, step.phases, step.reason, step.message) == (
            {"a": 1},
            {},
            None,
            None,
        )
    assert 0.0 <= first.offset_s <= second.offset_s <= tidy.offset_s

    await Runner(deps).run(once, "default")
    _, ctx, _ = look.seen[-1]
    assert (ctx.reuse_connections, ctx.cookies, ctx.one_request) == (False, True, True)
    assert (ctx.run.flow, ctx.run.variant, ctx.run.location) == ("once", "default", "here")
