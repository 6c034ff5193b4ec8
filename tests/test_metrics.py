"""/metrics on the admin listener: contract labels, OpenMetrics negotiation, the token rule."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from monitor.config import Config
from monitor.engine import Engine, Options
from monitor.metrics import METRIC_NAMES, Metrics, MetricsSink
from monitor.results import RunResult, StepResult
from probes.errors import ConfigError
from tests.fixtures.core import free_port, serve
from tests.test_http import target_app

FLOW = """\
flows:
  - name: f
    variants: {{stable: {{base_url: "http://127.0.0.1:{port}"}}}}
    steps:
      - {{name: ok, kind: http, url: "{{{{ variant.base_url }}}}/json"}}
      - {{name: bad, kind: http, url: "{{{{ variant.base_url }}}}/status/503"}}
      - {{name: never, kind: http, url: "{{{{ variant.base_url }}}}/json"}}
"""


async def test_metrics_carry_contract_labels_and_openmetrics(
    load_flows: Callable[[str], Config],
) -> None:
    target = await serve(target_app())
    admin = f"127.0.0.1:{free_port()}"
    engine = Engine(
        load_flows(FLOW.format(port=target.port)),
        Options(admin_listen=admin, location="eu-test-1"),
        CollectorRegistry(),
    )
    await engine.start(schedule=False)
    try:
        await engine.run_once(engine.select())
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{admin}/metrics") as resp:
                text = await resp.text()
                assert resp.headers["Content-Type"].startswith("text/plain")
            headers = {"Accept": "application/openmetrics-text"}
            async with http.get(f"http://{admin}/metrics", headers=headers) as resp:
                assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
                assert (await resp.text()).rstrip().endswith("# EOF")
            async with http.get(f"http://{admin}/readyz") as resp:
                assert resp.status == 200
    finally:
        await engine.stop()
        await target.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    base = {"flow": "f", "variant": "stable", "location": "eu-test-1"}

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted({**base, **labels}.items()))))

    assert value("hopwatch_runs_total", outcome="failure") == 1
    assert value("hopwatch_step_failures_total", step="bad", kind="http", reason="http_status") == 1
    assert value("hopwatch_step_duration_seconds_count", step="ok", kind="http") == 1
    assert value("hopwatch_link_up", step="ok") == 1
    assert value("hopwatch_link_up", step="bad") == 0
    # skipped after the broken link: it did not run, so it is not down (no link_up yet: it
    # never ran), and it says it was skipped
    assert value("hopwatch_link_up", step="never") is None
    assert value("hopwatch_link_skipped", step="never") == 1
    assert value("hopwatch_link_skipped", step="bad") is None
    # a failure series appears with the hop's first failure of that reason (the alert and the
    # boards count a series that just appeared): none for a hop that never failed
    assert (
        value("hopwatch_step_failures_total", step="ok", kind="http", reason="http_status") is None
    )
    assert value("hopwatch_flow_up") == 0
    exported = {name for name, _ in samples}
    # by default: no `_created` samples, no phase histograms, 15 latency buckets
    assert not any(name.endswith("_created") for name in exported)
    assert "hopwatch_http_phase_duration_seconds_count" not in exported
    les = {dict(labels)["le"] for (name, labels) in samples
           if name == "hopwatch_step_duration_seconds_bucket"}  # fmt: skip
    assert len(les) == 15 and "5.0" in les
    of_flow = [labels for _, labels in samples if ("flow", "f") in labels]
    assert len(of_flow) <= 30 * 3, f"{len(of_flow)} series for the flow's 3 links"
    for name, kind in METRIC_NAMES.items():
        if kind == "histogram":
            assert f"{name}_bucket" in exported or name in (
                "hopwatch_http_phase_duration_seconds",  # asked for (test below)
                "hopwatch_event_loop_lag_seconds",  # observed by a background task over time
                "hopwatch_scheduler_lag_seconds",  # only with the scheduler on
                "hopwatch_step_own_duration_seconds",  # waiting hops only (test_webhooks)
            )
    assert ("hopwatch_build_info", (("version", __import__("monitor").__version__),)) in samples


ASKED = """\
settings:
  metrics: {http_phases: true, created_series: true, latency_buckets: [0.01, 0.1, 1, 5]}
flows:
  - name: f
    steps: [{name: ok, kind: http, url: "http://127.0.0.1:%d/json"}]
  - name: g
    http_phases: false
    steps: [{name: ok, kind: http, url: "http://127.0.0.1:%d/json"}]
"""


async def test_optional_series_when_asked(load_flows: Callable[[str], Config]) -> None:
    """settings.metrics: phase histograms (a flow may say no), `_created` samples, buckets."""
    target = await serve(target_app())
    registry = CollectorRegistry()
    engine = Engine(load_flows(ASKED % (target.port, target.port)), Options(), registry)
    try:
        await engine.start(schedule=False, admin=False)
        await engine.run_once(engine.select())
        samples = [s for family in registry.collect() for s in family.samples]
    finally:
        await engine.stop()
        await target.close()
        Engine(load_flows(FLOW.format(port=1)), Options(), CollectorRegistry())  # switch back
    phased = {s.labels["flow"] for s in samples
              if s.name == "hopwatch_http_phase_duration_seconds_count"}  # fmt: skip
    assert phased == {"f"}
    assert any(s.name == "hopwatch_runs_created" for s in samples)
    les = {s.labels["le"] for s in samples if s.name == "hopwatch_run_duration_seconds_bucket"}
    assert les == {"0.01", "0.1", "1.0", "5.0", "+Inf"}


def test_latency_buckets_must_keep_the_slo_bound(load_flows: Callable[[str], Config]) -> None:
    with pytest.raises(ConfigError, match="must include 5"):
        load_flows("settings: {metrics: {latency_buckets: [0.1, 1]}}\n" + FLOW.format(port=1))


@pytest.mark.parametrize(
    ("listen", "token", "error"),
    [
        ("0.0.0.0:{port}", None, "not loopback: give --admin-token"),
        ("127.0.0.1:{port}", None, None),
    ],
)
async def test_admin_needs_a_token_off_loopback(
    load_flows: Callable[[str], Config], listen: str, token: str | None, error: str | None
) -> None:
    engine = Engine(
        load_flows(FLOW.format(port=1)),
        Options(admin_listen=listen.format(port=free_port()), admin_token=token),
        CollectorRegistry(),
    )
    try:
        if error:
            with pytest.raises(ValueError, match=error):
                await engine.start(schedule=False)
        else:
            await engine.start(schedule=False)
    finally:
        await engine.stop()


async def test_token_protects_everything_but_health(load_flows: Callable[[str], Config]) -> None:
    admin = f"127.0.0.1:{free_port()}"
    engine = Engine(
        load_flows(FLOW.format(port=1)),
        Options(admin_listen=admin, admin_token="t0ken-123"),
        CollectorRegistry(),
    )
    await engine.start(schedule=False)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{admin}/metrics") as resp:
                assert resp.status == 401
            auth = {"Authorization": "Bearer t0ken-123"}
            async with http.get(f"http://{admin}/metrics", headers=auth) as resp:
                assert resp.status == 200
            async with http.get(f"http://{admin}/healthz") as resp:
                assert resp.status == 200
    finally:
        await engine.stop()


def _run(statuses: dict[str, str]) -> RunResult:
    steps = [
        StepResult(name=name, kind="http", status=status, started_at=0.0, offset_s=0.0,  # type: ignore[arg-type]
                   latency_s=0.01 if status == "passed" else None,
                   reason="http_status" if status == "failed" else None)
        for name, status in statuses.items()
    ]  # fmt: skip
    outcome = "failure" if "failed" in statuses.values() else "success"
    return RunResult("r", "f", "stable", "here", "c", 0.0, 0.1, outcome, steps)  # type: ignore[arg-type]


def test_a_skipped_hop_keeps_its_link_up_and_says_skipped() -> None:
    """One break is counted once: the hops after it are skipped, not down."""
    registry = CollectorRegistry()
    sink = MetricsSink(Metrics(registry))
    labels = {"flow": "f", "variant": "stable", "location": "here"}

    def gauge(name: str, step: str) -> float | None:
        return registry.get_sample_value(name, {**labels, "step": step})

    sink.submit(_run({"a": "passed", "b": "passed"}))
    sink.submit(_run({"a": "failed", "b": "skipped"}))
    assert (gauge("hopwatch_link_up", "a"), gauge("hopwatch_link_up", "b")) == (0, 1)
    assert gauge("hopwatch_link_skipped", "b") == 1
    sink.submit(_run({"a": "passed", "b": "failed"}))
    assert (gauge("hopwatch_link_up", "b"), gauge("hopwatch_link_skipped", "b")) == (0, 0)
    sink.submit(_run({"a": "failed", "b": "skipped"}))
    assert gauge("hopwatch_link_up", "b") == 0  # still what it was when it last ran


def test_forgetting_a_flow_removes_its_skipped_gauge_and_own_latency() -> None:
    registry = CollectorRegistry()
    sink = MetricsSink(Metrics(registry))
    run = _run({"a": "failed", "b": "skipped"})
    sink.submit(_run({"a": "passed", "b": "passed"}))
    sink.submit(run)
    waiting = _run({"a": "passed", "b": "passed"})
    waiting.steps[1].own_latency_s = 0.004
    sink.submit(waiting)
    labels = {"flow": "f", "variant": "stable", "location": "here", "step": "b"}
    own = {**labels, "kind": "http"}
    assert registry.get_sample_value("hopwatch_link_skipped", labels) == 0
    assert registry.get_sample_value("hopwatch_step_own_duration_seconds_count", own) == 1
    sink.forget(["f"])
    assert registry.get_sample_value("hopwatch_link_skipped", labels) is None
    assert registry.get_sample_value("hopwatch_step_own_duration_seconds_count", own) == 1
    sink.forget(["f"], every_series=True)
    assert registry.get_sample_value("hopwatch_step_own_duration_seconds_count", own) is None


@pytest.mark.parametrize(
    ("settings", "native", "classic"),
    [
        ("{}", True, False),
        ("{native_histograms: false}", False, False),
        ("{classic_with_native: true}", True, True),
    ],
)
async def test_native_histogram_settings_reach_the_latency_histograms(
    load_flows: Callable[[str], Config], settings: str, native: bool, classic: bool
) -> None:
    """settings.metrics.native_histograms and classic_with_native (README "Metrics")."""
    text = FLOW.format(port=1)
    config = load_flows(f"settings:\n  metrics: {settings}\n{text}")
    metrics = Engine(config, Options(), CollectorRegistry()).metrics
    for family in (metrics.run_duration, metrics.step_duration, metrics.step_own_duration,
                   metrics.http_phase):  # fmt: skip
        assert (family.native is not None) is native
        assert family.classic_with_native is classic
    assert metrics.loop_lag.native is None and metrics.scheduler_lag.native is None
