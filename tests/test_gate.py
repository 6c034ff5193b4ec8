"""The canary gate against two real shops (stable and canary): the CLI's exit codes, the Argo
Rollouts and Flagger endpoints, the window source over a real SQLite store, the gate's metrics,
and how run results become the judge's samples."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
import typer
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import MultiDict
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from typer.testing import CliRunner

from monitor.config import Config, load
from monitor.demo.shop import FAULTS_KEY, Faults, build_shop_app
from monitor.engine import Engine, Options
from monitor.gate.command import gate
from monitor.gate.judge import judge
from monitor.gate.models import GateError, GateRequest
from monitor.gate.routes import FLAGGER_PATH, GATE_PATH, install_gate_routes, query_fields
from monitor.gate.samples import FLOW_ERROR_RATIO, from_runs, metric_samples
from monitor.gate.service import evaluate, gate_metrics
from monitor.results import RunResult, StepResult

BURST = ["--burst", "12", "--concurrency", "8", "--min-samples", "10"]
BURST_PARAMS = {"burst": "12", "concurrency": "8", "min_samples": "10"}
SLOWER_MS = 60

FLOWS = """
flows:
  - name: checkout
    timeout: 10s
    variants:
      stable: {{base_url: "{stable}"}}
      canary: {{base_url: "{canary}"}}
    steps:
      - name: create_order
        kind: http
        method: POST
        url: "{{{{ variant.base_url }}}}/orders"
        json: {{sku: "probe-1", ref: "{{{{ run.correlation }}}}"}}
        expect: {{status: 201}}
        extract:
          order_id: {{json: "$.id"}}
      - name: read_back
        kind: http
        url: "{{{{ variant.base_url }}}}/orders/{{{{ steps.create_order.order_id }}}}"
        expect: {{status: 200}}
    cleanup:
      - name: delete_order
        kind: http
        method: DELETE
        url: "{{{{ variant.base_url }}}}/orders/{{{{ steps.create_order.order_id }}}}"
        expect: {{status: [204, 404]}}
"""

Shops = tuple[TestServer, TestServer]


def faults(server: TestServer) -> Faults:
    found: Faults = server.app[FAULTS_KEY]
    return found


def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def shops() -> AsyncIterator[Shops]:
    """Two instances of the demo shop: (stable, canary)."""
    servers = (
        TestServer(build_shop_app(Faults()), host="127.0.0.1"),
        TestServer(build_shop_app(Faults()), host="127.0.0.1"),
    )
    for server in servers:
        await server.start_server()
    yield servers
    for server in servers:
        await server.close()


@pytest.fixture
def flow_file(shops: Shops, write_flows: Callable[[str], Path]) -> Path:
    stable, canary = shops
    return write_flows(FLOWS.format(stable=base_url(stable), canary=base_url(canary)))


@pytest.fixture
def config(flow_file: Path) -> Config:
    return load([flow_file])


@pytest.fixture
async def engine(config: Config, registry: CollectorRegistry) -> AsyncIterator[Engine]:
    """A started engine (no schedule, no listeners): what bursts run on."""
    engine = Engine(config, Options(), registry)
    await engine.start(schedule=False, admin=False)
    yield engine
    await engine.stop()


async def cli(*args: str) -> tuple[int, str, str]:
    """`hopwatch gate ARGS` through typer's runner, in a thread: the command runs its own event
    loop while the shops keep serving on the test's."""
    app = typer.Typer()
    app.command()(gate)
    result = await asyncio.to_thread(
        CliRunner().invoke, app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"}
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


# --- the command line -------------------------------------------------------------------------


async def test_identical_variants_pass(flow_file: Path) -> None:
    code, out, err = await cli(str(flow_file), "--flow", "checkout", *BURST, "--output", "json")
    assert code == 0, (out, err)
    report = json.loads(out)
    assert report["verdict"] == "pass" and report["passed"] is True
    assert report["samples"] == {"canary": 12, "baseline": 12}
    names = [m["name"] for m in report["metrics"]]
    assert names == [
        "hop.create_order.latency",
        "hop.create_order.error_ratio",
        "hop.read_back.latency",
        "hop.read_back.error_ratio",
        "flow.duration",
        "flow.error_ratio",
    ]  # cleanup is never a hop
    # A canary that happens to be faster on a hop is "low", which passes for latency (direction
    # "increase"); with 12 samples of identical systems that happens now and then, so only a
    # failing classification would be wrong here.
    assert not any(m["failed"] for m in report["metrics"]), report
    assert all(m["classification"] in ("pass", "low") for m in report["metrics"])


async def test_slower_canary_fails_naming_the_hop(shops: Shops, flow_file: Path) -> None:
    _, canary = shops
    faults(canary).latency_ms = SLOWER_MS
    code, out, err = await cli(str(flow_file), "--canary", "canary", "--baseline", "stable", *BURST)
    assert code == 1, (out, err)
    assert "verdict: fail" in out
    # The reasons name the hops that got slower, with how much.
    slow = [
        line for line in out.splitlines() if "hop.create_order.latency" in line and "High" in line
    ]
    assert slow, out
    assert "hop.read_back.latency" in out


async def test_marginal_exits_1_unless_allowed(
    shops: Shops, flow_file: Path, tmp_path: Path
) -> None:
    faults(shops[1]).latency_ms = SLOWER_MS
    judge_file = tmp_path / "judge.yaml"
    judge_file.write_text("pass_threshold: 100\nmarginal_threshold: 40\n")  # 50 is marginal
    args = [str(flow_file), *BURST, "--judge-config", str(judge_file), "--output", "json"]
    code, out, err = await cli(*args)
    assert code == 1, (out, err)
    assert json.loads(out)["verdict"] == "marginal"
    code, out, err = await cli(*args, "--allow-marginal")
    assert code == 0, (out, err)
    report = json.loads(out)
    assert (report["verdict"], report["passed"]) == ("marginal", True)
    assert report["reasons"][0] == "warning: marginal verdict let through (allow_marginal)"


async def test_two_samples_are_inconclusive(flow_file: Path) -> None:
    code, out, err = await cli(str(flow_file), "--burst", "2", "--output", "json")
    assert code == 3, (out, err)
    report = json.loads(out)
    assert report["verdict"] == "inconclusive"
    assert report["samples"] == {"canary": 2, "baseline": 2}
    assert any("too few samples" in r for r in report["reasons"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--flow", "nope", "--burst", "3"], "unknown flow 'nope'; known flows: checkout"),
        (["--canary", "blue", "--burst", "3"], "no flow has both variants 'blue' and 'stable'"),
        ([], "give exactly one of window"),
        (["--burst", "3", "--window", "5m"], "give exactly one of window"),
        (["--window", "5m"], "--window reads past runs from the store: give --store URL"),
        (["--window", "soon", "--store", "sqlite+aiosqlite://"], "not a duration: 'soon'"),
        (
            ["--burst", "3", "--critical", "hop.create_order.latncy"],
            "critical metric 'hop.create_order.latncy' is not among this gate's metrics",
        ),
        (["--window", "5m", "--store", "sqlite+aiosqlite://"], "the store could not be read"),
    ],
)
async def test_unanswerable_requests_exit_2(flow_file: Path, args: list[str], message: str) -> None:
    code, out, err = await cli(str(flow_file), *args)
    assert code == 2, (out, err)
    assert message in err


# --- Argo Rollouts and Flagger ----------------------------------------------------------------


@pytest.fixture
async def gate_server(engine: Engine, registry: CollectorRegistry) -> AsyncIterator[TestServer]:
    app = web.Application()
    install_gate_routes(app, engine=engine, store=None, metrics_registry=registry)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_json(
    http: aiohttp.ClientSession, url: Any, params: Any = None
) -> tuple[int, dict[str, Any]]:
    async with http.get(url, params=params) as response:
        return response.status, await response.json()


async def post_json(http: aiohttp.ClientSession, url: Any, body: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=body) as response:
        return response.status, await response.json()


async def test_argo_endpoint_answers_200_with_the_verdict(
    shops: Shops, gate_server: TestServer, http: aiohttp.ClientSession
) -> None:
    url = gate_server.make_url(GATE_PATH)
    params = {"flow": "checkout", "canary": "canary", "baseline": "stable", **BURST_PARAMS}
    status, body = await get_json(http, url, params)
    assert status == 200, body
    assert body["verdict"] == "pass" and body["score"] == 100.0
    assert {m["classification"] for m in body["metrics"]} == {"pass"}
    assert body["flows"][0]["samples"] == {"canary": 12, "baseline": 12}

    faults(shops[1]).latency_ms = SLOWER_MS
    status, body = await get_json(http, url, params)
    assert status == 200, body  # a failing canary is a measurement, not an error, to Argo
    assert body["verdict"] == "fail" and body["passed"] is False
    high = {m["name"] for m in body["metrics"] if m["classification"] == "high"}
    assert high == {"hop.create_order.latency", "hop.read_back.latency", "flow.duration"}


async def test_argo_post_takes_the_fields_as_a_json_body(
    gate_server: TestServer, http: aiohttp.ClientSession
) -> None:
    url = gate_server.make_url(GATE_PATH)
    status, body = await post_json(http, url, {"flow": ["checkout"], "burst": 2})
    assert status == 200, body
    assert body["verdict"] == "inconclusive" and body["burst"] == 2
    status, body = await post_json(http, url, ["checkout"])
    assert status == 400
    assert body["error"] == "body must be a JSON object of gate parameters"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"flow": "checkout", "burst": "0"}, "burst: Input should be greater than or equal to 1"),
        ({"flow": "checkout", "burst": "3", "colour": "red"}, "colour: Extra inputs"),
        ({"flow": "checkout", "burst": "3", "canary": "stable"}, "canary and baseline are both"),
        ({"flow": "checkout", "window": "5m"}, "this monitor has none"),
        ({"flow": "nope", "burst": "3"}, "unknown flow 'nope'"),
        ([("burst", "3"), ("burst", "4")], "burst: given 2 times, want once"),
    ],
)
async def test_argo_endpoint_refuses_bad_parameters_with_400(
    gate_server: TestServer, http: aiohttp.ClientSession, params: Any, message: str
) -> None:
    status, body = await get_json(http, gate_server.make_url(GATE_PATH), params)
    assert status == 400
    assert message in body["error"]


def flagger_body(phase: str = "Progressing", **metadata: str) -> dict[str, Any]:
    meta = {"flow": "checkout", "canary": "canary", "baseline": "stable", **BURST_PARAMS}
    meta.update(metadata)
    return {
        "name": "shop",
        "namespace": "prod",
        "phase": phase,
        "checksum": "abc",
        "metadata": meta,
    }


async def test_flagger_endpoint_200_on_pass_412_with_reasons_on_fail(
    shops: Shops, gate_server: TestServer, http: aiohttp.ClientSession
) -> None:
    url = gate_server.make_url(FLAGGER_PATH)
    status, body = await post_json(http, url, flagger_body())
    assert status == 200, body
    assert body["verdict"] == "pass" and body["judged"] is True

    status, body = await post_json(http, url, flagger_body(hook="rollback"))
    assert status == 412, body  # healthy: do not roll back
    assert body["rollback"] is False

    faults(shops[1]).latency_ms = SLOWER_MS
    status, body = await post_json(http, url, flagger_body())
    assert status == 412, body
    assert body["verdict"] == "fail"
    assert any("hop.create_order.latency" in r and "High" in r for r in body["reasons"])

    status, body = await post_json(http, url, flagger_body(hook="rollback"))
    assert status == 200, body  # roll back now
    assert body["rollback"] is True

    status, body = await post_json(http, url, flagger_body("Succeeded", hook="rollback"))
    assert status == 412, body  # nothing to roll back once the canary is done
    assert body["judged"] is False


async def test_flagger_inconclusive_holds_the_canary(
    gate_server: TestServer, http: aiohttp.ClientSession
) -> None:
    url = gate_server.make_url(FLAGGER_PATH)
    status, body = await post_json(http, url, flagger_body(burst="2"))
    assert status == 412, body
    assert body["verdict"] == "inconclusive"


@pytest.mark.parametrize(
    "body",
    [
        flagger_body(hook="post-rollout"),
        flagger_body(phase="Succeeded"),
        # Flagger's event webhooks replace the metadata with the event's own.
        {
            "name": "shop",
            "namespace": "prod",
            "phase": "Progressing",
            "metadata": {
                "eventMessage": "Advance shop.prod canary weight 10",
                "eventType": "Normal",
            },
        },
    ],
)
async def test_flagger_hooks_that_do_not_gate_answer_200_unjudged(
    gate_server: TestServer, http: aiohttp.ClientSession, registry: CollectorRegistry, body: Any
) -> None:
    status, answer = await post_json(http, gate_server.make_url(FLAGGER_PATH), body)
    assert status == 200, answer
    assert answer["judged"] is False
    assert registry.get_sample_value(
        "hopwatch_gate_verdicts_total", {"flow": "checkout", "verdict": "pass"}
    ) in (None, 0.0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"namespace": "prod"}, "not a Flagger webhook body: name: Field required"),
        (flagger_body(hook="sometimes"), "unknown hook 'sometimes'"),
        (flagger_body(window="soon"), "window: Value error, not a duration"),
        (["shop"], "not a Flagger webhook body"),
    ],
)
async def test_flagger_refuses_malformed_bodies_with_the_error_as_text(
    gate_server: TestServer, http: aiohttp.ClientSession, body: Any, message: str
) -> None:
    status, answer = await post_json(http, gate_server.make_url(FLAGGER_PATH), body)
    assert status == 400
    assert message.replace("Value error, ", "") in answer["error"]


# --- metrics ----------------------------------------------------------------------------------


async def test_verdicts_and_scores_are_counted_per_flow(
    shops: Shops, engine: Engine, registry: CollectorRegistry
) -> None:
    request = GateRequest(flow=("checkout",), burst=12, min_samples=10)
    result = await evaluate(request, engine=engine, store=None)
    assert result.verdict == "pass"
    faults(shops[1]).latency_ms = SLOWER_MS
    result = await evaluate(request, engine=engine, store=None)
    assert result.verdict == "fail" and result.exit_code == 1

    def count(verdict: str) -> float | None:
        labels = {"flow": "checkout", "verdict": verdict}
        return registry.get_sample_value("hopwatch_gate_verdicts_total", labels)

    assert (count("pass"), count("fail"), count("marginal"), count("inconclusive")) == (1, 1, 0, 0)
    assert registry.get_sample_value("hopwatch_gate_score", {"flow": "checkout"}) == result.score
    assert gate_metrics(registry) is gate_metrics(registry)  # no double registration


# --- the window source over the store ---------------------------------------------------------


async def test_window_judges_the_stores_runs(
    shops: Shops, flow_file: Path, config: Config, registry: CollectorRegistry, tmp_path: Path
) -> None:
    from monitor.store import Store

    store_url = f"sqlite+aiosqlite:///{tmp_path / 'hopwatch.db'}"
    store = Store(store_url)
    await store.migrate()
    engine = Engine(config, Options(extra_sinks=[store]), registry)
    await engine.start(schedule=False, admin=False)
    try:
        faults(shops[1]).latency_ms = SLOWER_MS
        pairs = engine.select(["checkout"], ["stable", "canary"])
        await engine.run_once(pairs, repeat=12, concurrency=8)
        assert await store.flush()
        request = GateRequest(flow=("checkout",), window="10m", min_samples=10)
        result = await evaluate(request, engine=engine, store=store)
        assert result.verdict == "fail", result.reasons
        assert (result.flows[0].canary_runs, result.flows[0].baseline_runs) == (12, 12)
        assert result.since is not None and result.until == pytest.approx(result.since + 600)
        assert any("hop.read_back.latency" in r for r in result.reasons)
        # The command line reads the same window from the same database.
        code, out, err = await cli(
            str(flow_file), "--window", "10m", "--store", store_url, "--min-samples", "10",
            "--output", "json",
        )  # fmt: skip
        assert code == 1, (out, err)
        assert json.loads(out)["samples"] == {"canary": 12, "baseline": 12}
        # The same window without the engine: flows must be named, and are read from the store.
        alone = await evaluate(request, engine=None, store=store, registry=registry)
        assert alone.verdict == "fail"
        # Before the runs there was nothing to judge.
        before = request.model_copy(update={"until": result.since})
        empty = await evaluate(before, engine=engine, store=store)
        assert empty.verdict == "inconclusive"
        assert empty.flows[0].canary_runs == 0
        quiet = [(m.name, m.classification) for m in empty.flows[0].verdict.metrics]
        assert quiet[:2] == [
            ("hop.create_order.latency", "nodata"),
            ("hop.create_order.error_ratio", "nodata"),
        ]  # every hop of the config shows, even without a run
    finally:
        await engine.stop()
        await store.close()


async def test_window_judges_one_location_when_asked(
    shops: Shops, flow_file: Path, config: Config, tmp_path: Path
) -> None:
    """Two monitors at two locations share a store; the canary is slow from one only."""
    from monitor.store import Store

    store_url = f"sqlite+aiosqlite:///{tmp_path / 'hopwatch.db'}"
    store = Store(store_url)
    await store.migrate()
    engines = {
        loc: Engine(config, Options(location=loc, extra_sinks=[store]), CollectorRegistry())
        for loc in ("eu-west-1", "us-east-1")
    }
    try:
        for loc, engine in engines.items():
            await engine.start(schedule=False, admin=False)
            faults(shops[1]).latency_ms = SLOWER_MS if loc == "eu-west-1" else 0
            pairs = engine.select(["checkout"], ["stable", "canary"])
            await engine.run_once(pairs, repeat=12, concurrency=8)
        assert await store.flush()
        request = GateRequest(flow=("checkout",), window="10m", min_samples=10)
        slow = await evaluate(request.model_copy(update={"location": "eu-west-1"}), engine=None,
                              store=store, registry=CollectorRegistry())  # fmt: skip
        assert slow.verdict == "fail", slow.reasons
        assert (slow.flows[0].canary_runs, slow.flows[0].baseline_runs) == (12, 12)
        # The command line (and so the HTTP gate, with the same field) filters the same way.
        code, out, err = await cli(
            str(flow_file), "--window", "10m", "--store", store_url, "--min-samples", "10",
            "--location", "us-east-1", "--output", "json",
        )  # fmt: skip
        assert json.loads(out)["samples"] == {"canary": 12, "baseline": 12}, err
        assert (code, json.loads(out)["verdict"]) == (0, "pass"), out
        both = await evaluate(request, engine=None, store=store, registry=CollectorRegistry())
        assert both.flows[0].canary_runs == 24  # no filter: every location
    finally:
        for engine in engines.values():
            await engine.stop()
        await store.close()


async def test_window_leaves_out_runs_in_maintenance_windows(
    shops: Shops, config: Config, registry: CollectorRegistry, tmp_path: Path
) -> None:
    """The canary breaks only while a window covers it (planned work): not the canary's doing."""
    from monitor.store import Store

    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'hopwatch.db'}")
    await store.migrate()
    engine = Engine(config, Options(extra_sinks=[store]), registry)
    await engine.start(schedule=False, admin=False)
    try:
        pairs = engine.select(["checkout"], ["stable", "canary"])
        now = engine.maintenance.clock()
        window = await engine.maintenance.add(
            flows=["checkout"], variants=[], start=now, end=now + 3600, reason="db upgrade"
        )
        faults(shops[1]).status = 503
        planned = await engine.run_once(pairs, repeat=12, concurrency=8)
        assert all(r.maintenance for r in planned)
        assert {r.outcome for r in planned if r.variant == "canary"} == {"failure"}
        await engine.maintenance.end(window.id)
        faults(shops[1]).status = None
        after = await engine.run_once(pairs, repeat=12, concurrency=8)
        assert not any(r.maintenance for r in after)
        assert await store.flush()
        request = GateRequest(flow=("checkout",), window="10m", min_samples=10)
        result = await evaluate(request, engine=engine, store=store)
        assert (result.flows[0].canary_runs, result.flows[0].baseline_runs) == (12, 12)
        assert result.verdict == "pass", result.reasons
        errors = next(m for m in result.flows[0].verdict.metrics if m.name == FLOW_ERROR_RATIO)
        assert errors.classification == "pass"
    finally:
        await engine.stop()
        await store.close()


async def test_window_without_a_flow_name_or_a_store_is_refused() -> None:
    with pytest.raises(GateError, match="name the flow"):
        await evaluate(GateRequest(window="5m"), engine=None, store=object())
    with pytest.raises(GateError, match="has none"):
        await evaluate(GateRequest(window="5m", flow="checkout"), engine=None, store=None)


# --- requests and samples ---------------------------------------------------------------------


def test_request_reads_query_and_metadata_spellings() -> None:
    request = GateRequest.model_validate(
        {"flow": "a, b", "window": "10m", "min_samples": "5", "allow_marginal": "true"}
    )
    assert request.flow == ("a", "b") and request.window == 600.0
    assert request.source == "window" and request.allow_marginal is True
    judge = request.judge_config()
    assert (judge.min_samples, judge.min_error_samples) == (5, 5)
    assert GateRequest(burst=3).judge_config().min_error_samples == 20  # the judge's default
    with pytest.raises(ValidationError, match="canary and baseline are both 'x'"):
        GateRequest(burst=3, canary="x", baseline="x")


def _run(variant: str, outcome: str, *steps: tuple[str, str, float | None]) -> RunResult:
    return RunResult(
        run_id=f"{variant}-{outcome}",
        flow="checkout",
        variant=variant,
        location="local",
        correlation="c",
        started_at=0.0,
        duration_s=0.5,
        outcome=outcome,  # type: ignore[arg-type]
        steps=[
            StepResult(name, "http", status, 0.0, 0.0, latency)  # type: ignore[arg-type]
            for name, status, latency in steps
        ]
        + [StepResult("delete_order", "http", "failed", 0.0, 0.0, 0.1, cleanup=True)],
    )


def test_samples_count_a_broken_link_once_and_ignore_aborted_runs() -> None:
    runs = [
        _run("canary", "success", ("create", "passed", 0.01), ("read", "passed", 0.02)),
        _run("canary", "failure", ("create", "failed", None), ("read", "skipped", None)),
        _run("canary", "failure", ("create", "passed", 0.03), ("read", "failed", 0.5)),
        _run("canary", "aborted", ("create", "passed", 0.04), ("read", "aborted", None)),
        _run("stable", "success", ("create", "passed", 0.01), ("read", "passed", 0.02)),
    ]
    canary = from_runs(runs, "checkout", "canary")
    assert canary.runs == 3  # the aborted run is the monitor's, not the target's
    assert canary.run_errors == [0.0, 1.0, 1.0] and canary.durations == [0.5]
    assert canary.links["create"].errors == [0.0, 1.0, 0.0, 0.0]  # aborted run's hop passed
    assert canary.links["create"].latencies == [0.01, 0.03, 0.04]
    assert canary.links["read"].errors == [0.0, 1.0]  # skipped and aborted are not counted
    assert canary.links["read"].latencies == [0.02]  # only passed hops have a latency
    assert "delete_order" not in canary.links
    metrics = metric_samples(canary, from_runs(runs, "checkout", "stable"))
    critical = [m.name for m in metrics if m.critical]
    assert critical == [FLOW_ERROR_RATIO]
    assert {m.name: dict(m.labels) for m in metrics}["hop.read.latency"] == {
        "flow": "checkout",
        "step": "read",
        "kind": "http",
    }


# --- the deploy examples ----------------------------------------------------------------------

DEPLOY = Path(__file__).parent.parent / "deploy" / "gate"


def substitute(text: str, args: dict[str, str]) -> str:
    """Argo's `{{args.name}}` placeholders, filled in."""
    return re.sub(r"\{\{args\.([\w-]+)\}\}", lambda m: args[m.group(1)], text)


def test_argo_templates_ask_the_gate_what_it_understands() -> None:
    for template in yaml.safe_load_all((DEPLOY / "argo-analysis-template.yaml").read_text()):
        args = {a["name"]: a.get("value", "x") for a in template["spec"]["args"]}
        for metric in template["spec"]["metrics"]:
            web_ = metric["provider"]["web"]
            parsed = urlsplit(substitute(web_["url"], args))
            assert parsed.path == GATE_PATH
            fields = query_fields(MultiDict(parse_qsl(parsed.query)))
            GateRequest.model_validate({**fields, "flow": "checkout"})
            assert "result.passed" in metric["successCondition"]
            assert web_["headers"][0]["key"] == "Authorization"


def test_flagger_webhooks_ask_the_gate_what_it_understands() -> None:
    canary = yaml.safe_load((DEPLOY / "flagger-canary.yaml").read_text())
    for hook in canary["spec"]["analysis"]["webhooks"]:
        assert urlsplit(hook["url"]).path == FLAGGER_PATH
        metadata = dict(hook["metadata"])
        assert metadata.pop("hook", "rollout") == hook["type"]
        assert all(isinstance(v, str) for v in metadata.values())  # Flagger's map[string]string
        GateRequest.model_validate(metadata)


def test_the_gate_judges_each_hop_on_its_own_part_and_names_only_the_one_that_changed() -> None:
    """The API alone got 150 ms slower in the canary: the Kafka hop, timed from the API call's
    start, carries those 150 ms too, but its own part (after the call ended) did not move."""
    rng = random.Random(7)
    runs = []
    for i in range(30):
        for variant, extra in (("stable", 0.0), ("canary", 0.150)):
            api = 0.020 + extra + rng.uniform(0, 0.004)
            own = 0.030 + rng.uniform(0, 0.004)  # the worker and broker: unchanged
            steps = [
                StepResult("create_order", "http", "passed", 0.0, 0.0, api),
                StepResult("order_event", "kafka_consume", "passed", 0.0, api, api + own,
                           own_latency_s=own),
            ]  # fmt: skip
            runs.append(
                RunResult(
                    f"{variant}{i}",
                    "checkout",
                    variant,
                    "local",
                    "c",
                    0.0,
                    api + own,
                    "success",
                    steps,
                )
            )
    metrics = metric_samples(
        from_runs(runs, "checkout", "canary"), from_runs(runs, "checkout", "stable")
    )
    result = judge(metrics)
    high = [m.name for m in result.metrics if m.classification == "high"]
    assert "hop.create_order.latency" in high
    assert "hop.order_event.latency" not in high
    assert any("create_order" in reason for reason in result.reasons)
    assert not any("order_event" in reason for reason in result.reasons)
