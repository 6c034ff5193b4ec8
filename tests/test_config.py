"""Flow files: every bad-config fixture gives its exact message; good files load; schema exports."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from monitor.config import FileConfig, load
from probes import KINDS, StepConfig
from probes.durations import parse_duration
from probes.errors import ConfigError

INVALID = Path(__file__).parent / "configs" / "invalid"
ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("case", sorted(INVALID.glob("*.yaml")), ids=lambda p: p.stem)
def test_invalid_config_reports_file_line_and_field(case: Path) -> None:
    want = case.with_suffix(".txt").read_text().strip()
    want = want.replace("{file}", str(case)).replace("KINDS", ", ".join(sorted(KINDS)))
    with pytest.raises(ConfigError) as caught:
        load([case])
    assert caught.value.problems == [want]


def test_every_problem_of_every_file_is_reported(tmp_path: Path) -> None:
    cases = [INVALID / "bad-duration.yaml", INVALID / "missing-url.yaml"]
    with pytest.raises(ConfigError) as caught:
        load(cases)
    assert [p.split(":")[0] for p in caught.value.problems] == [str(c) for c in cases]


def test_duplicate_flow_names_across_files_name_both(tmp_path: Path) -> None:
    text = 'flows:\n  - {name: f, steps: [{name: a, kind: http, url: "http://127.0.0.1:1/"}]}\n'
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load([tmp_path])
    assert caught.value.problems == [
        f"{tmp_path / 'b.yaml'}:1: flow 'f': name already used in {tmp_path / 'a.yaml'}"
    ]


@pytest.mark.parametrize(
    "path", [*sorted((ROOT / "examples").glob("*.yaml")), ROOT / "monitor/demo/flows.yaml"]
)
def test_shipped_flow_files_are_valid(path: Path) -> None:
    config = load([path])
    assert config.flows


def test_defaults_and_variants(load_flows) -> None:  # type: ignore[no-untyped-def]
    config = load_flows(
        'flows:\n  - {name: f, interval: 2m, steps: [{name: a, kind: http, url: "http://x/"}]}\n'
    )
    flow = config.flows[0]
    assert flow.interval == 120.0
    assert flow.spread == 12.0  # 10% of the interval
    assert list(flow.variants) == ["default"]
    assert config.settings.marker_header == "X-Hopwatch-Run"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), (3, 3.0), ("1.5s", 1.5)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5", "-1s", "1 week", True, None, "ms"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_kind_registry_and_config_union_agree() -> None:
    """The kinds are listed once; this fails if the union and the registry drift apart."""
    union = StepConfig.__origin__  # type: ignore[attr-defined]
    kinds = {member.model_fields["kind"].annotation.__args__[0] for member in union.__args__}
    assert kinds == set(KINDS)
    for kind, spec in KINDS.items():
        module = __import__(f"probes.{kind}", fromlist=["Config"])
        assert spec is module.SPEC
        assert spec.config is module.Config
        assert isinstance(
            spec.probe, getattr(module, "".join(p.title() for p in kind.split("_")) + "Probe")
        )


def test_json_schema_is_valid_and_accepts_the_examples() -> None:
    schema = FileConfig.model_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    import yaml

    doc = yaml.safe_load((ROOT / "examples" / "shop.yaml").read_text())
    jsonschema.validate(doc, json.loads(json.dumps(schema)))


def test_validate_reports_secret_references_that_do_not_resolve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from monitor.config import unresolved_secrets

    monkeypatch.delenv("HOPWATCH_DEMO_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("HOPWATCH_DEMO_ORDERS_DB", raising=False)
    path = ROOT / "examples" / "shop.yaml"
    problem = "environment variable HOPWATCH_DEMO_WEBHOOK_SECRET is not set"
    assert unresolved_secrets(load([path])) == [
        f"{path}:40: flow 'checkout' step 'fulfilment_webhook': {problem}",
        f"{path}:54: flow 'checkout' step 'order_row': environment variable "
        "HOPWATCH_DEMO_ORDERS_DB is not set",
        f"{path}:82: flow 'order_via_kafka' step 'confirmation': {problem}",
    ]
    monkeypatch.setenv("HOPWATCH_DEMO_WEBHOOK_SECRET", "whsec_QUJD")
    monkeypatch.setenv("HOPWATCH_DEMO_ORDERS_DB", "sqlite:///orders.db")
    assert unresolved_secrets(load([path])) == []
