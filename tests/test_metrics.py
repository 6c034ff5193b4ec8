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
    assert (
        value("hopwatch_step_failures_total", step="never", kind="http", reason="http_status")
        == 0  # created at 0 at start, so the first failure is an increase; never counted
    )
    assert value("hopwatch_flow_up") == 0
    phases = {
        dict(labels)["phase"]
        for (name, labels) in samples
        if name == "hopwatch_http_phase_duration_seconds_count"
    }
    assert {"connect", "processing", "transfer"} <= phases
    exported = {name for name, _ in samples}
    for name, kind in METRIC_NAMES.items():
        if kind == "histogram":
            assert f"{name}_bucket" in exported or name in (
                "hopwatch_event_loop_lag_seconds",  # observed by a background task over time
                "hopwatch_scheduler_lag_seconds",  # only with the scheduler on
                "hopwatch_step_own_duration_seconds",  # waiting hops only (test_webhooks)
            )
    assert ("hopwatch_build_info", (("version", __import__("monitor").__version__),)) in samples


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
