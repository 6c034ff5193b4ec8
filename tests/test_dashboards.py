"""Checks grafana/: valid dashboards, in step with their generator, whose every query parses,
names only hopwatch's metrics, and returns data from a real Prometheus scraping hopwatch."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from deploy.kubernetes.generate_prometheusrule import rule_groups
from monitor.cluster.metrics import CLUSTER_METRIC_NAMES
from monitor.metric_text import choose_encoder  # what hopwatch's /metrics writes
from monitor.metrics import METRIC_NAMES
from probes.browser_pool import BROWSER_METRIC_NAMES, settings_from_env
from tests.fixtures.prometheus import (
    PrometheusError,
    PrometheusFactory,
    PrometheusServer,
    SampleHopwatch,
    expr_problems,
    free_port,
    known_series,
    promtool,
)

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
RULE_FILES = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))
PROTOBUF = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily"
# Grafana's interval variables, as the test's 1 s scrape interval would make them.
INTERVALS = {"__rate_interval": "20s", "__interval": "5s", "__range": "1m"}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
LABEL_VALUES = re.compile(r"label_values\((.*),\s*(\w+)\)", re.S)


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


DASHBOARDS = {path.name: load(path) for path in DASHBOARD_FILES}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in panels(dashboard):
        for target in panel["targets"]:
            yield panel, target


def variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return list(dashboard["templating"]["list"])


def label_values(var: dict[str, Any]) -> tuple[str, str]:
    """(selector, label) of a `label_values(selector, label)` variable query."""
    found = LABEL_VALUES.fullmatch(var["query"])
    assert found, f"variable {var['name']}: not a label_values() query: {var['query']}"
    return found[1], found[2]


def substitute(text: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        assert name in values, f"unknown variable ${name} in {text}"
        return values[name]

    return VARIABLE.sub(one, text)


def grafana_regex_escape(value: str) -> str:
    """How Grafana escapes a value inside a Prometheus regex matcher string."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def placeholder_values(dashboard: dict[str, Any]) -> dict[str, str]:
    """Some value for every variable: enough to parse the queries."""
    values = dict(INTERVALS)
    for var in variables(dashboard):
        values[var["name"]] = var["query"] if var["type"] == "constant" else "x"
    return values


# --- the JSON -----------------------------------------------------------------------------------


def test_there_are_an_overview_and_a_flow_dashboard() -> None:
    assert set(DASHBOARDS) == {"hopwatch-overview.json", "hopwatch-flow.json"}
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_is_valid_grafana_json(name: str) -> None:
    dashboard = DASHBOARDS[name]
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] and dashboard["title"]
    names = {var["name"]: var for var in variables(dashboard)}
    assert {"datasource", "flow", "variant", "location"} <= set(names)
    assert names["datasource"] == names["datasource"] | {
        "type": "datasource",
        "query": "prometheus",
    }
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids), "panel ids repeat"
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip()
        if "repeat" in panel:
            assert panel["repeat"] in names
    assert_no_overlap(dashboard["panels"])


def assert_no_overlap(all_panels: list[dict[str, Any]]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in all_panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def load_generator() -> ModuleType:
    """grafana/generate.py is a script, not a package module: load it from its path."""
    name = "hopwatch_grafana_generate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, GRAFANA / "generate.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_committed_json_is_what_the_generator_writes() -> None:
    generator = load_generator()
    boards = list(generator.rendered())
    for path, text in boards:
        assert path.read_text(encoding="utf-8") == text, f"run: python grafana/generate.py ({path})"
    # The sidecar's ConfigMap holds the same JSON, byte for byte.
    configmap = generator.CONFIGMAP
    assert configmap.read_text(encoding="utf-8") == generator.configmap(boards), (
        f"run: python grafana/generate.py ({configmap})"
    )
    data = yaml.safe_load(configmap.read_text(encoding="utf-8"))["data"]
    assert data == {path.name: text for path, text in boards}


RECORDED = re.compile(r"hopwatch:[a-z0-9_:]+")


def test_deploy_readme_lists_the_panels_that_need_recording_rules() -> None:
    """deploy/README.md's table names each panel that reads a recorded series, and only those."""
    wanted = set()
    for dashboard in DASHBOARDS.values():
        row = ""
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                row = panel["title"]
                continue
            series = {s for t in panel["targets"] for s in RECORDED.findall(t["expr"])}
            if series:
                wanted.add((dashboard["title"], row, panel["title"], frozenset(series)))
    text = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    after = text.split("<!-- checked: tests/test_dashboards.py", 1)[1]
    table = after.split("\n", 1)[1].split("\n\n", 1)[0]
    listed = set()
    for line in table.splitlines()[2:]:
        board, row, panel, series = (cell.strip() for cell in line.strip("|").split("|"))
        listed.add((board, row, panel, frozenset(RECORDED.findall(series))))
    assert listed == wanted
    recorded = {
        rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule
    }
    assert all(s <= recorded for *_, s in wanted), "a panel reads a series no rule records"


def test_every_metric_is_on_a_board() -> None:
    exprs = " ".join(t["expr"] for d in DASHBOARDS.values() for _, t in queries(d))
    names = METRIC_NAMES | CLUSTER_METRIC_NAMES | BROWSER_METRIC_NAMES
    missing = [name for name in names if not re.search(rf"\b{name}", exprs)]
    assert missing == []


def test_flow_dashboard_links_latency_to_traces_and_compares_variants() -> None:
    dashboard = DASHBOARDS["hopwatch-flow.json"]
    heatmaps = [p for p in panels(dashboard) if p["type"] == "heatmap"]
    assert heatmaps and all(t.get("exemplar") for p in heatmaps for t in p["targets"])
    assert all(t["format"] == "heatmap" for p in heatmaps for t in p["targets"])
    assert any(p.get("repeat") == "variant" for p in panels(dashboard))
    flow = next(v for v in variables(dashboard) if v["name"] == "flow")
    assert flow["multi"] is False, "the flow dashboard shows one flow"


def test_overview_cluster_row_stacks_owned_flows_against_the_configured_line() -> None:
    dashboard = DASHBOARDS["hopwatch-overview.json"]
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    start = next(i for i, p in enumerate(dashboard["panels"]) if p["title"] == "Cluster")
    assert rows[-1]["title"] == "Cluster"
    cluster = {p["title"]: p for p in dashboard["panels"][start + 1 :]}
    assert set(cluster) == {
        "Members", "Owned flows per replica", "Rebalances", "Forwarded arrivals",
        "Forwarding delay",
    }  # fmt: skip
    owned = cluster["Owned flows per replica"]
    by_ref = {t["refId"]: t["expr"] for t in owned["targets"]}
    assert "by (instance)" in by_ref["A"] and "hopwatch_cluster_owned_flows" in by_ref["A"]
    assert by_ref["B"] == "max(hopwatch_cluster_flows)"
    assert owned["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    (override,) = owned["fieldConfig"]["overrides"]
    assert override["matcher"] == {"id": "byFrameRefID", "options": "B"}
    unstacked = {"id": "custom.stacking", "value": {"mode": "none", "group": "A"}}
    assert unstacked in override["properties"], "the configured line must not stack"
    delay = " ".join(t["expr"] for t in cluster["Forwarding delay"]["targets"])
    assert "hopwatch_cluster_forward_delay_seconds_bucket" in delay


# --- queries parse and name only what hopwatch exports ------------------------------------------


def all_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every panel query and variable selector, with variables filled in."""
    found = []
    for name, dashboard in DASHBOARDS.items():
        values = placeholder_values(dashboard)
        for panel, target in queries(dashboard):
            where = f"{name}: {panel['title']} [{target['refId']}]"
            found.append((where, substitute(target["expr"], values)))
        for var in variables(dashboard):
            if var["type"] == "query":
                selector, _ = label_values(var)
                found.append((f"{name}: variable {var['name']}", substitute(selector, values)))
    return found


def test_every_query_parses_for_promtool(tmp_path: Path) -> None:
    exprs = all_exprs()
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n" + "\n".join(
        f"query_{i}: {where}" for i, (where, _) in enumerate(exprs)
    )


def test_every_query_names_only_exported_metrics() -> None:
    known = known_series(rule_groups())
    problems = {where: expr_problems(expr, known) for where, expr in all_exprs()}
    assert {where: found for where, found in problems.items() if found} == {}


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_variables_ask_for_labels_their_metric_has(name: str) -> None:
    known = known_series(rule_groups())
    for var in variables(DASHBOARDS[name]):
        if var["type"] == "query":
            selector, label = label_values(var)
            metric = selector.split("{", 1)[0].strip()
            assert label in known[metric], f"{var['name']}: {metric} has no label {label}"


# --- provisioning -------------------------------------------------------------------------------


def test_datasource_links_exemplars_to_traces() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning/datasources/hopwatch.yaml").read_text())
    sources = {source["uid"]: source for source in config["datasources"]}
    prometheus = next(s for s in sources.values() if s["type"] == "prometheus")
    assert prometheus["isDefault"] is True
    (link,) = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert link["name"] == "trace_id", "the exemplar label hopwatch writes"
    assert link["datasourceUid"] in sources


def test_dashboards_are_provisioned_from_where_compose_mounts_them() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning/dashboards/hopwatch.yaml").read_text())
    (provider,) = config["providers"]
    compose = yaml.safe_load((REPO / "deploy/compose.yaml").read_text())
    mounts = dict(
        v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["grafana"]["volumes"]
    )
    assert mounts["../grafana/dashboards"] == provider["options"]["path"]
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"


# --- every panel shows data from a real Prometheus ---------------------------------------------


@pytest.fixture
async def sample_target(registry: CollectorRegistry) -> AsyncIterator[tuple[str, list[str]]]:
    """An aiohttp server on loopback exposing hopwatch's metrics; every scrape is one more round.

    Yields its address and the Accept headers of the scrapes it answered.
    """
    sample = SampleHopwatch(registry)
    accepts: list[str] = []

    async def metrics(request: web.Request) -> web.Response:
        accept = request.headers.get("Accept", "")
        accepts.append(accept)
        sample.tick()
        encode, content_type = choose_encoder(accept)
        return web.Response(body=encode(registry), headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"127.0.0.1:{server.port}", accepts
    finally:
        await server.close()


Pick = Callable[[dict[str, Any], list[str]], list[str]]


def pick_first(var: dict[str, Any], options: list[str]) -> list[str]:
    return [options[0]]


def pick_all(var: dict[str, Any], options: list[str]) -> list[str]:
    """All, as Grafana sends it for a multi-value variable: a regex of every value."""
    if var.get("includeAll"):
        return ["(" + "|".join(grafana_regex_escape(o) for o in options) + ")"]
    return [options[0]]


async def resolve_variables(
    prom: PrometheusServer, dashboard: dict[str, Any], pick: Pick
) -> tuple[dict[str, str], dict[str, list[str]]] | None:
    """Fills the variables as Grafana would, in order; None while Prometheus has no values yet."""
    values, options = dict(INTERVALS), {}
    for var in variables(dashboard):
        if var["type"] == "datasource":
            continue
        if var["type"] == "constant":
            values[var["name"]] = var["query"]
            continue
        selector, label = label_values(var)
        found = await prom.label_values(label, substitute(selector, values))
        if not found:
            return None
        options[var["name"]] = found
        values[var["name"]] = pick(var, found)[0]
    return values, options


def panel_queries(
    dashboard: dict[str, Any], values: dict[str, str], options: dict[str, list[str]]
) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(where, target, expr) as Grafana would send them; a repeated panel once per value."""
    for panel, target in queries(dashboard):
        repeat = panel.get("repeat")
        fills = [values | {repeat: value} for value in options[repeat]] if repeat else [values]
        for filled in fills:
            title = substitute(panel["title"], filled)
            yield f"{title} [{target['refId']}]", target, substitute(target["expr"], filled)


def has_data(result: list[dict[str, Any]]) -> bool:
    """Some finite sample, or a native histogram (a heatmap's query) that counted something."""
    return any(
        math.isfinite(float(sample["value"][1]))
        if "value" in sample
        else float(sample["histogram"][1]["count"]) > 0
        for sample in result
    )


async def pending_queries(prom: PrometheusServer, pick: Pick) -> dict[str, str]:
    """The dashboard queries that return no finite sample (yet)."""
    empty: dict[str, str] = {}
    for name, dashboard in DASHBOARDS.items():
        resolved = await resolve_variables(prom, dashboard, pick)
        if resolved is None:
            empty[f"{name}: variables"] = "label_values() found nothing"
            continue
        for where, _, expr in panel_queries(dashboard, *resolved):
            if not has_data(await prom.query(expr)):
                empty[f"{name}: {where}"] = expr
    return empty


async def wait_for_every_panel(
    prom: PrometheusServer, pick: Pick, known_gaps: dict[str, str] | None = None
) -> None:
    """Waits until every dashboard query returns data, but the known gaps (query: why).

    Fails naming the panels without data; and a known gap that fills is named too, so the
    list only ever shrinks.
    """
    gaps = known_gaps or {}
    empty: dict[str, str] = {}

    async def only_gaps_empty() -> bool:
        empty.clear()
        empty.update(await pending_queries(prom, pick))
        return set(empty) <= set(gaps)

    try:
        await prom.wait_for(only_gaps_empty, "every panel to show data", timeout_s=45)
    except PrometheusError:
        missing = {k: v for k, v in empty.items() if k not in gaps}
        pytest.fail(f"panels without data ({pick.__name__}):\n{json.dumps(missing, indent=1)}")
    filled = set(gaps) - set(empty)
    assert not filled, f"these panels show data now, drop them from the known gaps: {filled}"


async def assert_exemplar_queries_link_to_traces(prom: PrometheusServer) -> None:
    """Every query that asks Grafana for exemplars gets some, each carrying a trace id."""
    dashboard = DASHBOARDS["hopwatch-flow.json"]
    resolved = await resolve_variables(prom, dashboard, pick_first)
    assert resolved is not None
    asked = 0
    for where, target, expr in panel_queries(dashboard, *resolved):
        if target.get("exemplar"):
            asked += 1
            found = await prom.query_exemplars(expr)
            ids = [e["labels"].get("trace_id", "") for s in found for e in s["exemplars"]]
            assert any(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), f"{where}: {found}"
    assert asked


@pytest.mark.prometheus
@pytest.mark.parametrize("native", [False, True], ids=["classic", "native"])
async def test_every_panel_shows_data_from_a_real_prometheus(
    sample_target: tuple[str, list[str]], prometheus_factory: PrometheusFactory, native: bool
) -> None:
    """Every panel and recording rule, on classic histograms (text and OpenMetrics scrapes) and
    on native ones (Prometheus with native histograms on negotiates protobuf). One Prometheus
    for all checks: it needs ~5 s before its first scrape."""
    target, accepts = sample_target
    prom = await prometheus_factory([target], rule_files=RULE_FILES, native_histograms=native)
    for pick in (pick_all, pick_first):
        await wait_for_every_panel(prom, pick)
    if native:
        assert all(PROTOBUF in accept for accept in accepts)
        # the latency histograms arrived native: no classic series beside them
        assert await prom.query("count(hopwatch_step_duration_seconds)")
        assert not await prom.query("count(hopwatch_step_duration_seconds_bucket)")
        assert not await prom.query("count(hopwatch_run_duration_seconds_count)")
    else:
        # Prometheus asks for OpenMetrics only with exemplar storage on; exemplars need it
        assert any("application/openmetrics-text" in accept for accept in accepts)
        assert not any(PROTOBUF in accept for accept in accepts)
        assert not await prom.query("count(hopwatch_step_duration_seconds)")
    await assert_exemplar_queries_link_to_traces(prom)


# Panels the bundled demo leaves empty today, and why. The demo test fails when one of them
# shows data, so that this list only shrinks.
CLUSTER_PANELS = (
    "Members [A]", "Members [B]", "Owned flows per replica [A]", "Owned flows per replica [B]",
    "Rebalances [A]", "Forwarded arrivals [A]", "Forwarding delay [A]", "Forwarding delay [B]",
)  # fmt: skip
NOT_IN_THE_DEMO = (
    "DNS: answer time p95 [A]", "gRPC: call latency p95 [A]", "TCP: DNS, connect and TLS p95 [A]",
    "TCP and gRPC: certificate time left [A]",
)  # fmt: skip
BROWSER_READINGS = (
    "Browser: shared Chromium memory [A]", "Browser: steps and restarts [A]",
    "Browser: steps and restarts [B]", "Browser: steps and restarts [C]",
)  # fmt: skip
# As the demo decides (monitor/demo/runner.py): its browser flow runs only where it can.
DEMO_HAS_BROWSER = bool(
    shutil.which(settings_from_env()[0]) and importlib.util.find_spec("playwright")
)
ALL_BROKEN = "sum(hopwatch_step_failures_total) > 0"
DEMO_GAPS = {
    "hopwatch-flow.json: Canary gate verdicts [A]": "nothing asks the gate during the demo",
    "hopwatch-flow.json: Canary gate score [A]": "nothing asks the gate during the demo",
    "hopwatch-overview.json: Certificates expiring soonest [A]": "the demo speaks plain HTTP",
    **{
        f"hopwatch-overview.json: {panel}": "the demo has no tcp, dns or grpc step"
        for panel in NOT_IN_THE_DEMO
    },
    "hopwatch-overview.json: Browser: phases p95 [A]": "the demo's browser flow exports no phases",
    **{
        f"hopwatch-overview.json: {panel}": "no Chromium here: the demo runs without checkout_ui"
        for panel in ([] if DEMO_HAS_BROWSER else BROWSER_READINGS)
    },
    **(
        {}
        if DEMO_HAS_BROWSER  # the fault breaks checkout_ui's page too: the test waits for it
        else {
            "hopwatch-overview.json: Broken links by kind and reason [A]": "the fault breaks "
            "an http hop; without checkout_ui no hop of those kinds breaks (sql is skipped)"
        }
    ),
    **{
        f"hopwatch-overview.json: {panel}": "the demo is one process, not a cluster"
        for panel in CLUSTER_PANELS
    },
}


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def wait_until_serving(
    proc: asyncio.subprocess.Process, log: Path, urls: list[str], timeout_s: float = 60
) -> None:
    """Polls the URLs until each answers 200; a process has no other way to say it is up."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for url in urls:
            while True:
                if proc.returncode is not None:
                    pytest.fail(f"the demo exited with {proc.returncode}:\n{tail(log)}")
                try:
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    pytest.fail(f"{url} did not answer in {timeout_s}s:\n{tail(log)}")
                await asyncio.sleep(0.2)


@pytest.fixture
async def demo_system(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """`hopwatch demo` on free loopback ports, traces on so latencies carry exemplars.

    Yields the admin (metrics) and shop addresses; stops the demo after the test.
    """
    admin, shop, public, kafka = (f"127.0.0.1:{free_port()}" for _ in range(4))
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "monitor", "demo", "--duration", "120",
            f"--admin-listen={admin}", f"--shop-listen={shop}", f"--listen={public}",
            f"--kafka-listen={kafka}",
            env=os.environ | {"OTEL_TRACES_EXPORTER": "console"},
            stdout=asyncio.subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    try:
        await wait_until_serving(proc, log, [f"http://{shop}/faults", f"http://{admin}/readyz"])
        yield admin, shop
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)


@pytest.mark.prometheus
@pytest.mark.kafka
async def test_every_panel_shows_data_from_the_demo(
    demo_system: tuple[str, str], prometheus_factory: PrometheusFactory
) -> None:
    """The bundled demo, scraped by a real Prometheus with hopwatch's rules, fills the boards."""
    admin, shop = demo_system
    prom = await prometheus_factory([admin], rule_files=RULE_FILES)

    async def link_broke() -> bool:
        broken = 'sum(hopwatch_step_failures_total{kind="browser"}) > 0'
        return bool(await prom.query(broken if DEMO_HAS_BROWSER else ALL_BROKEN))

    # A broken link for the boards to show: the shop answers 503 until one run broke on it.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.post(
            f"http://{shop}/faults", json={"status": 503, "paths": ["/orders"]}
        ) as resp:
            assert resp.status == 200
        # checkout_ui runs every 30 s: its page breaks on the fault too, given the time
        await prom.wait_for(link_broke, "a run to break on the injected fault", timeout_s=75)
        async with http.delete(f"http://{shop}/faults") as resp:
            assert resp.status == 200
    await wait_for_every_panel(prom, pick_all, DEMO_GAPS)
    await assert_exemplar_queries_link_to_traces(prom)


def test_link_health_panels_show_passed_failed_and_skipped_apart(tmp_path: Path) -> None:
    """A hop skipped after a broken link reads SKIPPED (2), never FAILED (0), on every link
    panel: promtool evaluates each panel's query on a failed, a passed and a skipped hop."""
    panels = [
        (panel, target)
        for dashboard in DASHBOARDS.values()
        for panel, target in queries(dashboard)
        if "hopwatch_link_up" in target["expr"]
    ]
    assert len(panels) == 3  # overview, flow, and the flow's per-location copy
    series = {  # hop: (link_up, link_skipped); c passed before and is skipped now
        "a": ("0", None),
        "b": ("1", "0"),
        "c": ("1", "1"),
    }
    input_series = []
    for step, (up, skipped) in series.items():
        labels = f'flow="f",step="{step}",variant="stable",location="l",instance="i",job="j"'
        input_series.append({"series": f"hopwatch_link_up{{{labels}}}", "values": f"{up}x3"})
        if skipped is not None:
            input_series.append(
                {"series": f"hopwatch_link_skipped{{{labels}}}", "values": f"{skipped}x3"}
            )
    tests = []
    for panel, target in panels:
        states = {m["options"][v]["text"] for m in panel["fieldConfig"]["defaults"]["mappings"]
                  for v in m["options"]}  # fmt: skip
        assert states == {"PASSED", "FAILED", "SKIPPED"}
        expr = target["expr"].replace('flow="$flow"', 'flow="f"')
        expr = expr.replace('location="$location"', 'location="l"')  # a repeated panel's own
        expr = VARIABLE.sub(".*", expr)
        by = re.search(r"min by \(([^)]*)\)", expr)
        assert by is not None
        keep = [label.strip() for label in by.group(1).split(",")]
        expected = []
        for step, value in (("a", 0), ("b", 1), ("c", 2)):
            all_labels = {"flow": "f", "step": step, "variant": "stable"}
            shown = ",".join(f'{k}="{all_labels[k]}"' for k in keep)
            expected.append({"labels": f"{{{shown}}}", "value": value})
        tests.append({"expr": expr, "eval_time": "1m", "exp_samples": expected})
    path = tmp_path / "link_states_test.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "rule_files": [],
                "evaluation_interval": "1m",
                "tests": [
                    {"interval": "1m", "input_series": input_series, "promql_expr_test": tests}
                ],
            }
        )
    )
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
