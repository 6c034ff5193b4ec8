"""Kinds from outside `probes/`: one registered by a test module, one installed through the
`hopwatch.kinds` entry point group; both validate, run, time and count like built-in kinds."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest
from prometheus_client import CollectorRegistry
from pydantic import Field

from monitor.config import Config
from monitor.engine import Engine, Options
from probes import KINDS
from probes.base import StepConfigBase, StepContext, StepOutcome
from probes.errors import AssertionFailed, ConfigError
from probes.kinds import Kinds, KindSpec, SpanShape


class EchoConfig(StepConfigBase):
    """Render `say` and hand it on; fail with `assertion` when it renders to `want_not`."""

    kind: Literal["echo"] = Field(description="Step kind.")
    say: str = Field(description="A template.")
    want_not: str | None = Field(default=None, description="Fail when `say` renders to this.")


class EchoProbe:
    async def run(self, config: EchoConfig, ctx: StepContext) -> StepOutcome:
        said = ctx.render(config.say)
        if said == config.want_not:
            raise AssertionFailed(f"said {said!r}, want anything else")
        return StepOutcome(vars={"said": said})


ECHO = KindSpec(
    EchoConfig,
    EchoProbe(),
    failures=(AssertionFailed,),
    span=lambda config, ctx: SpanShape(f"echo {config.say}", "internal"),
)

FLOW = """
flows:
  - name: echoes
    steps:
      - {name: first, kind: echo, say: "hello {{ run.flow }}"}
      - {name: second, kind: echo, say: "{{ steps.first.said }}!", want_not: "WANT_NOT"}
"""


@pytest.fixture
def echo_kind() -> Iterator[KindSpec[EchoConfig]]:
    KINDS.register(ECHO)
    yield ECHO
    KINDS.unregister(ECHO.name)


async def test_a_kind_from_a_test_module_registers_and_runs_end_to_end(
    echo_kind: KindSpec[EchoConfig], load_flows: Callable[[str], Config]
) -> None:
    registry = CollectorRegistry()
    async with Engine(load_flows(FLOW), Options(), registry) as engine:
        await engine.start(schedule=False, admin=False)
        [result] = await engine.run_once(engine.select())
        [broken] = await engine.run_once(
            [(load_flows(FLOW.replace("WANT_NOT", "hello echoes!")).flows[0], "default")]
        )
    assert result.outcome == "success", result.steps
    assert [(s.name, s.kind, s.status) for s in result.steps] == [
        ("first", "echo", "passed"),
        ("second", "echo", "passed"),
    ]
    assert (broken.steps[1].status, broken.steps[1].reason) == ("failed", "assertion")
    labels = {"flow": "echoes", "step": "second", "kind": "echo", "variant": "default"}
    labels["location"] = engine.location
    assert registry.get_sample_value("hopwatch_step_duration_seconds_count", labels) == 1.0
    # A failure series appears with the hop's first failure of that reason, none before.
    failures = {
        r: registry.get_sample_value("hopwatch_step_failures_total", labels | {"reason": r})
        for r in ("assertion", "timeout", "error", "not_received")
    }
    assert failures == {"assertion": 1.0, "timeout": None, "error": None, "not_received": None}


def test_an_unregistered_kind_is_unknown_again(load_flows: Callable[[str], Config]) -> None:
    KINDS.register(ECHO)
    assert load_flows(FLOW).flows[0].steps[0].kind == "echo"
    KINDS.unregister("echo")
    with pytest.raises(ConfigError) as caught:
        load_flows(FLOW)
    known = ", ".join(sorted(KINDS))
    assert caught.value.problems[0].endswith(f"unknown kind 'echo'; known kinds: {known}")


def test_registry_refuses_a_second_kind_of_one_name_and_a_config_without_kind() -> None:
    kinds = Kinds((ECHO,))
    kinds.register(ECHO)  # the same spec again is harmless
    other = KindSpec(EchoConfig, EchoProbe())
    with pytest.raises(ValueError, match="kind 'echo' is already registered"):
        kinds.register(other)

    class NoKind(StepConfigBase):
        pass

    with pytest.raises(TypeError, match="needs one `kind: Literal"):
        KindSpec(NoKind, EchoProbe())  # type: ignore[arg-type]


PLUGIN = '''
"""A step kind shipped by another package."""
from typing import Literal

from probes.base import StepConfigBase, StepContext, StepOutcome
from probes.kinds import KindSpec


class Config(StepConfigBase):
    kind: Literal["constant"]
    value: str


class ConstantProbe:
    async def run(self, config: Config, ctx: StepContext) -> StepOutcome:
        return StepOutcome(vars={"value": ctx.render(config.value)})


SPEC = KindSpec(Config, ConstantProbe())
'''


def _install_plugin(site: Path) -> None:
    """A package with a `hopwatch.kinds` entry point, as pip would leave it in site-packages."""
    (site / "hopwatch_constant.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "hopwatch_constant-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hopwatch-constant\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[hopwatch.kinds]\nconstant = hopwatch_constant:SPEC\n")


async def test_an_installed_package_adds_a_kind_through_the_entry_point_group(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _install_plugin(site)
    flows = tmp_path / "flows.yaml"
    flows.write_text(
        textwrap.dedent("""
        flows:
          - name: constants
            steps:
              - {name: one, kind: constant, value: "{{ run.flow }}"}
              - {name: two, kind: constant, value: "{{ steps.one.value }}-2"}
        """)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.getcwd()])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "monitor", "check", str(flows), "--output", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    [run] = json.loads(out)["runs"]
    assert [(s["name"], s["kind"], s["status"]) for s in run["steps"]] == [
        ("one", "constant", "passed"),
        ("two", "constant", "passed"),
    ]


class Counter:
    """A kind's shared resource: counts the steps that used it, and whether it was closed."""

    made: list[Counter] = []

    def __init__(self) -> None:
        self.used = 0
        self.closed = False
        Counter.made.append(self)

    async def aclose(self) -> None:
        self.closed = True


class CountConfig(StepConfigBase):
    kind: Literal["count"] = Field(description="Step kind.")


class CountProbe:
    async def run(self, config: CountConfig, ctx: StepContext) -> StepOutcome:
        counter = ctx.lent("count", Counter)
        counter.used += 1
        return StepOutcome(vars={"used": counter.used})


COUNT = KindSpec(CountConfig, CountProbe(), shared=Counter)


async def test_the_engine_makes_a_kinds_shared_resources_once_lends_them_and_closes_them(
    load_flows: Callable[[str], Config],
) -> None:
    KINDS.register(COUNT)
    Counter.made.clear()
    try:
        flows = load_flows(
            "flows:\n  - name: counts\n    steps:\n"
            "      - {name: a, kind: count}\n      - {name: b, kind: count}\n"
        )
        async with Engine(flows, Options(), CollectorRegistry()) as engine:
            await engine.start(schedule=False, admin=False)
            results = await engine.run_once(engine.select(), repeat=3)
            [counter] = Counter.made
            assert not counter.closed
        assert all(r.outcome == "success" for r in results), results
        assert counter.used == 6 and counter.closed  # every run borrowed the one; stop closed it
    finally:
        KINDS.unregister(COUNT.name)


async def test_a_kind_with_nothing_lent_fails_its_step_as_our_error(
    load_flows: Callable[[str], Config],
) -> None:
    KINDS.register(COUNT)
    try:
        flows = load_flows("flows:\n  - name: counts\n    steps:\n      - {name: a, kind: count}\n")
        engine = Engine(flows, Options(), CollectorRegistry())
        [result] = await engine.run_once(engine.select())  # never started: nothing lent
    finally:
        KINDS.unregister(COUNT.name)
    [step] = result.steps
    assert (step.reason, step.message) == (
        "error",
        "internal error: RuntimeError: the engine lent no Counter for count steps",
    )
