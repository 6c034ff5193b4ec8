"""Writes hopwatch's Grafana dashboards as JSON, so all panels share one layout and data source.

Run `python grafana/generate.py` after changing a panel; tests/test_dashboards.py fails when the
JSON under grafana/dashboards/ and this file disagree. The JSON is what Grafana provisions; the
same JSON, wrapped in a ConfigMap for Grafana's dashboard sidecar, goes to
deploy/kubernetes-grafana/configmap-dashboards.yaml.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
CONFIGMAP = DASHBOARD_DIR.parents[1] / "deploy" / "kubernetes-grafana" / "configmap-dashboards.yaml"
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Label selectors shared by the panels; `$flow` is multi-valued on the overview, single on detail.
OVERVIEW_SEL = 'flow=~"$flow", variant=~"$variant", location=~"$location"'
FLOW_SEL = 'flow="$flow", variant=~"$variant", location=~"$location"'
STEP_SEL = 'flow="$flow", step=~"$step", variant=~"$variant", location=~"$location"'
FLOW_LEGEND = "{{flow}} · {{variant}}"
HOP_LEGEND = "{{flow}}: {{step}}"
RUN_DURATION = "hopwatch_run_duration_seconds"
STEP_DURATION = "hopwatch_step_duration_seconds"
# The latency histograms a protobuf scrape gets as native histograms (one series, no _bucket,
# _count or _sum; README "Metrics"): their queries read either form, the classic one first.
NATIVE = frozenset({
    RUN_DURATION, STEP_DURATION, "hopwatch_step_own_duration_seconds",
    "hopwatch_http_phase_duration_seconds",
})  # fmt: skip


def up_mappings(down: str) -> list[dict[str, Any]]:
    """Shows a 0/1 gauge as words: `down` (red) and UP (green)."""
    return [
        {
            "type": "value",
            "options": {
                "0": {"text": down, "color": "red", "index": 0},
                "1": {"text": "UP", "color": "green", "index": 1},
            },
        }
    ]


# From a panel of the overview to the flow dashboard, keeping the time range.
FLOW_LINK = {
    "title": "Open flow ${__field.labels.flow}",
    "url": "/d/hopwatch-flow/hopwatch-flow?var-flow=${__field.labels.flow}&${__url_time_range}",
}


def with_flow_link(panel: dict[str, Any]) -> dict[str, Any]:
    """Lets a click on a series of the overview open that flow's dashboard."""
    panel["fieldConfig"]["defaults"]["links"] = [FLOW_LINK]
    return panel


def rate(series: str, sel: str, fn: str = "rate", window: str = "$__rate_interval") -> str:
    """`rate(series{sel}[window])`, or another range function over the same selection."""
    selector = f"{series}{{{sel}}}" if sel else series
    return f"{fn}({selector}[{window}])"


def failures(sel: str, window: str = "$__rate_interval") -> str:
    """Step failures in each window, per series: increase(), or all of a series that appeared
    within it (a failure counter is exported from the hop's first failure of that reason on,
    and increase() cannot see its step from nothing to the first count)."""
    series = f"hopwatch_step_failures_total{{{sel}}}" if sel else "hopwatch_step_failures_total"
    return f"({series} unless {series} offset {window} or increase({series}[{window}]))"


def ratio(by: str, series: str, sel: str, fn: str = "rate") -> str:
    """Mean of a histogram: rate of its _sum over rate of its _count, summed by `by` (or of a
    native one's histogram_sum and histogram_count)."""
    classic = (
        f"sum by ({by}) ({rate(series + '_sum', sel, fn)})"
        f" / sum by ({by}) ({rate(series + '_count', sel, fn)})"
    )
    if series not in NATIVE:
        return classic
    native = rate(series, sel, fn)
    return (
        f"({classic} or sum by ({by}) (histogram_sum({native}))"
        f" / sum by ({by}) (histogram_count({native})))"
    )


def quantile(q: str, by: str, histogram: str, sel: str) -> str:
    """`histogram_quantile` of a histogram's classic buckets, or of the native histogram, kept
    apart by the `by` labels."""
    buckets = rate(histogram + "_bucket", sel)
    classic = f"histogram_quantile({q}, sum by ({by}, le) ({buckets}))"
    if histogram not in NATIVE:
        return classic
    return f"({classic} or histogram_quantile({q}, sum by ({by}) ({rate(histogram, sel)})))"


def distribution(histogram: str, sel: str) -> str:
    """A heatmap's buckets over time: the classic ones by `le`, or the native histogram."""
    return f"sum by (le) ({rate(histogram + '_bucket', sel)}) or sum({rate(histogram, sel)})"


def success_ratio(by: str, sel: str) -> str:
    """Successful runs / finished runs (success or failure) over the dashboard's range."""
    ok = rate("hopwatch_runs_total", sel + ', outcome="success"', "increase", "$__range")
    done = rate("hopwatch_runs_total", sel + ', outcome=~"success|failure"', "increase", "$__range")
    return f"sum by ({by}) ({ok}) / sum by ({by}) ({done})"


def target(expr: str, legend: str = "__auto", ref: str = "A", **extra: Any) -> dict[str, Any]:
    """One Prometheus query of a panel."""
    return {
        "datasource": DATASOURCE,
        "refId": ref,
        "expr": expr,
        "legendFormat": legend,
        "range": extra.pop("range", True),
        "instant": extra.pop("instant", False),
        **extra,
    }


def targets(*queries: tuple[str, str]) -> list[dict[str, Any]]:
    """Several (expr, legend) queries with refIds A, B, C, ..."""
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)]


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


def timeseries(
    title: str,
    description: str,
    queries: list[dict[str, Any]],
    unit: str,
    *,
    bars: bool = False,
    stack: bool = False,
    threshold_steps: tuple[tuple[float | None, str], ...] = (),
) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 80 if bars else 10,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
    }
    defaults: dict[str, Any] = {"unit": unit, "custom": custom}
    if threshold_steps:
        defaults["thresholds"] = thresholds(*threshold_steps)
        custom["thresholdsStyle"] = {"mode": "dashed"}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "targets": queries,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    description: str,
    queries: list[dict[str, Any]],
    unit: str,
    *,
    mappings: list[dict[str, Any]] | None = None,
    threshold_steps: tuple[tuple[float | None, str], ...] = ((None, "green"),),
) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "targets": queries,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "mappings": mappings or [],
                "thresholds": thresholds(*threshold_steps),
                "color": {"mode": "thresholds"},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "value_and_name",
            "justifyMode": "auto",
            "orientation": "auto",
        },
    }


# The three health stats both dashboards show, each with its unit and thresholds in one place.


def up_stat(title: str, description: str, expr: str, legend: str) -> dict[str, Any]:
    """Whether the last run succeeded (hopwatch_flow_up): DOWN in red."""
    return stat(title, description, [target(expr, legend)], "none", mappings=up_mappings("DOWN"),
                threshold_steps=((None, "red"), (1, "green")))  # fmt: skip


def since_good_stat(description: str, expr: str, legend: str) -> dict[str, Any]:
    """Seconds since the last good run: orange after 5 minutes, red after 15."""
    return stat("Since the last good run", description, [target(expr, legend)], "s",
                threshold_steps=((None, "green"), (300, "orange"), (900, "red")))  # fmt: skip


def success_stat(description: str, by: str, sel: str, legend: str) -> dict[str, Any]:
    """Successful / finished runs: red below 99 %, orange below 99.5 %."""
    return stat("Runs that succeeded", description, [target(success_ratio(by, sel), legend)],
                "percentunit",
                threshold_steps=((None, "red"), (0.99, "orange"), (0.995, "green")))  # fmt: skip


# A link's state in one value: 0 failed, 1 passed, 2 skipped (after an earlier hop broke). A
# skipped hop keeps its hopwatch_link_up, so it is read from hopwatch_link_skipped first.
LINK_STATES: list[dict[str, Any]] = [
    {
        "type": "value",
        "options": {
            "0": {"text": "FAILED", "color": "red", "index": 0},
            "1": {"text": "PASSED", "color": "green", "index": 1},
            "2": {"text": "SKIPPED", "color": "#8c959f", "index": 2},
        },
    }
]


def link_state(by: str, sel: str) -> str:
    """The link-state query (see LINK_STATES), aggregated `by` these labels."""
    return (
        f"max by ({by}) (2 * hopwatch_link_skipped{{{sel}}}) > 0"
        f" or min by ({by}) (hopwatch_link_up{{{sel}}})"
    )


def link_history(title: str, description: str, queries: list[dict[str, Any]]) -> dict[str, Any]:
    """A status history of link states: passed, failed and skipped apart."""
    panel = status_history(title, description, queries)
    defaults = panel["fieldConfig"]["defaults"]
    defaults["mappings"] = LINK_STATES
    defaults["thresholds"] = thresholds((None, "red"), (1, "green"), (2, "#8c959f"))
    return panel


def status_history(title: str, description: str, queries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "status-history",
        "title": title,
        "description": description,
        "targets": queries,
        "fieldConfig": {
            "defaults": {
                "mappings": up_mappings("BROKEN"),
                "thresholds": thresholds((None, "red"), (1, "green")),
                "color": {"mode": "thresholds"},
                "custom": {"fillOpacity": 80, "lineWidth": 0},
            },
            "overrides": [],
        },
        "options": {
            "showValue": "never",
            "rowHeight": 0.9,
            "colWidth": 0.9,
            "legend": {"showLegend": False},
            "tooltip": {"mode": "single"},
        },
    }


def table(title: str, description: str, queries: list[dict[str, Any]], unit: str) -> dict[str, Any]:
    """An instant-query table; a `flow` column links to that flow's dashboard."""
    flow_column = {
        "matcher": {"id": "byName", "options": "flow"},
        "properties": [
            {
                "id": "links",
                "value": [
                    {
                        "title": "Open flow ${__value.raw}",
                        "url": "/d/hopwatch-flow/hopwatch-flow?var-flow=${__value.raw}"
                        "&${__url_time_range}",
                    }
                ],
            }
        ],
    }
    return {
        "type": "table",
        "title": title,
        "description": description,
        "targets": queries,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": [flow_column]},
        "options": {"showHeader": True, "sortBy": [{"displayName": "Value", "desc": True}]},
        "transformations": [
            {"id": "organize", "options": {"excludeByName": {"Time": True}}},
        ],
    }


def heatmap(title: str, description: str, queries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "targets": queries,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "exponent": 0.5, "steps": 64},
            "exemplars": {"color": "rgba(138, 43, 226, 0.9)"},
            "filterValues": {"le": 1e-9},
            "rowsFrame": {"layout": "auto"},
            "yAxis": {"axisPlacement": "left", "unit": "s"},
            "tooltip": {"mode": "single", "yHistogram": True},
            "legend": {"show": True},
        },
    }


def instant_table_target(expr: str) -> dict[str, Any]:
    return target(expr, "", format="table", range=False, instant=True)


@dataclass
class Layout:
    """Places panels left to right on Grafana's 24-column grid and numbers them."""

    panels: list[dict[str, Any]] = field(default_factory=list)
    x: int = 0
    y: int = 0
    row_height: int = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        self.y += 1

    def add(self, panel: dict[str, Any], w: int, h: int, **extra: Any) -> None:
        if self.x + w > 24:
            self._newline()
        panel.update(extra)
        panel["datasource"] = DATASOURCE
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)

    def _newline(self) -> None:
        self.y += self.row_height
        self.x = 0
        self.row_height = 0

    def numbered(self) -> list[dict[str, Any]]:
        for i, panel in enumerate(self.panels, start=1):
            panel["id"] = i
        return self.panels


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "regex": "",
        "hide": 0,
        "refresh": 1,
        "current": {},
        "options": [],
    }


def query_variable(
    name: str, label: str, definition: str, *, multi: bool = True, hide: int = 0
) -> dict[str, Any]:
    """A variable filled from label_values(); multi ones offer All (a regex of every value)."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": definition,
        "query": definition,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "hide": hide,
        "current": {},
        "options": [],
        "regex": "",
    }


def constant_variable(name: str, value: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "constant",
        "description": description,
        "query": value,
        "hide": 2,
        "current": {"text": value, "value": value},
        "options": [{"text": value, "value": value, "selected": True}],
    }


SLO_CONSTANTS = [
    constant_variable(
        "availability_slo", "0.995", "Availability SLO of deploy/prometheus/rules/alerts.yml"
    ),
    constant_variable("latency_slo", "0.99", "Latency SLO (runs within 5 s) of alerts.yml"),
]


def dashboard(
    uid: str, title: str, description: str, variables: list[dict[str, Any]], layout: Layout
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["hopwatch"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "title": "hopwatch",
                "tags": ["hopwatch"],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": {"list": variables},
        "panels": layout.numbered(),
    }


def overview() -> dict[str, Any]:
    """Every flow and link at a glance; broken links, latency, arrivals, SLOs, the monitor and
    its cluster."""
    lay = Layout()
    _overview_health(lay, OVERVIEW_SEL)
    _overview_breaks(lay, OVERVIEW_SEL)
    _overview_latency(lay, OVERVIEW_SEL)
    _overview_kinds(lay, OVERVIEW_SEL)
    _overview_arrivals(lay)
    _overview_slo(lay, OVERVIEW_SEL)
    _monitor_health(lay)
    _overview_maintenance(lay, OVERVIEW_SEL)
    _cluster(lay)
    for panel in lay.panels:
        if any("{{flow}}" in t.get("legendFormat", "") for t in panel.get("targets", [])):
            with_flow_link(panel)
    variables = [
        datasource_variable(),
        query_variable("flow", "Flow", "label_values(hopwatch_runs_total, flow)"),
        query_variable(
            "variant", "Variant", 'label_values(hopwatch_runs_total{flow=~"$flow"}, variant)'
        ),
        query_variable(
            "location",
            "Location",
            'label_values(hopwatch_runs_total{flow=~"$flow", variant=~"$variant"}, location)',
        ),
        *SLO_CONSTANTS,
    ]
    return dashboard(
        "hopwatch-overview",
        "hopwatch / overview",
        "Which flow is broken, at which hop, since when and why; latency per hop; arrivals;"
        " SLO burn; the monitor's own health.",
        variables,
        lay,
    )


def _overview_health(lay: Layout, sel: str) -> None:
    lay.row("Health")
    lay.add(
        up_stat(
            "Flows",
            "hopwatch_flow_up: whether the last run of each flow and variant succeeded.",
            f"min by (flow, variant) (hopwatch_flow_up{{{sel}}})",
            FLOW_LEGEND,
        ),
        w=8,
        h=6,
    )
    last_ok = f"max by (flow, variant) (hopwatch_last_success_timestamp_seconds{{{sel}}})"
    lay.add(
        since_good_stat(
            "Time since each flow last succeeded (hopwatch_last_success_timestamp_seconds).",
            f"time() - {last_ok}",
            FLOW_LEGEND,
        ),
        w=8,
        h=6,
    )
    lay.add(
        success_stat(
            "Successful / finished runs over the time range; aborted runs are left out.",
            "flow, variant",
            sel,
            FLOW_LEGEND,
        ),
        w=8,
        h=6,
    )
    lay.add(
        link_history(
            "Links of every flow",
            "Each hop over time: green passed, red failed, grey skipped after an earlier hop"
            " broke (hopwatch_link_skipped; a skipped hop is not counted as broken).",
            [target(link_state("flow, step", sel), HOP_LEGEND)],
        ),
        w=24,
        h=9,
    )


def _overview_breaks(lay: Layout, sel: str) -> None:
    lay.row("Broken links")
    lay.add(
        timeseries(
            "Broken links by reason",
            "Broken runs per interval, by the reason of the first failing hop"
            " (hopwatch_step_failures_total).",
            [target(f"sum by (reason) {failures(sel)}", "{{reason}}")],
            "short",
            bars=True,
            stack=True,
        ),
        w=12,
        h=8,
    )
    in_range = failures(sel, "$__range")
    lay.add(
        table(
            "Broken links in the time range",
            "Which hop broke, how often and why, over the dashboard's time range.",
            [
                instant_table_target(
                    f"sort_desc(sum by (flow, step, variant, location, reason) {in_range} > 0)"
                )
            ],
            "short",
        ),
        w=12,
        h=8,
    )
    expiry = (
        "min by (flow, step, variant, location)"
        f" (hopwatch_tls_cert_expiry_timestamp_seconds{{{sel}}})"
    )
    lay.add(
        table(
            "Certificates expiring soonest",
            "Time left on each TLS server certificate the hops saw in their last run"
            " (hopwatch_tls_cert_expiry_timestamp_seconds), soonest first.",
            [instant_table_target(f"sort(bottomk(20, {expiry} - time()))")],
            "s",
        ),
        w=24,
        h=7,
    )
    lay.add(
        timeseries(
            "Runs by outcome",
            "Finished runs per second by outcome (hopwatch_runs_total).",
            [target(f"sum by (outcome) ({rate('hopwatch_runs_total', sel)})", "{{outcome}}")],
            "ops",
            stack=True,
        ),
        w=12,
        h=8,
    )
    lay.add(
        timeseries(
            "Run duration p95",
            "95th percentile of a run's end-to-end duration (hopwatch_run_duration_seconds).",
            [target(quantile("0.95", "flow, variant", RUN_DURATION, sel), FLOW_LEGEND)],
            "s",
        ),
        w=12,
        h=8,
    )


def _overview_latency(lay: Layout, sel: str) -> None:
    lay.row("Per-hop latency")
    for q, pct in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")):
        lay.add(
            timeseries(
                f"Hop latency {pct}",
                f"{pct} of each hop's latency (hopwatch_step_duration_seconds); the points are"
                " exemplars: click one for the trace of that run.",
                [target(quantile(q, "flow, step", STEP_DURATION, sel), HOP_LEGEND, exemplar=True)],
                "s",
            ),
            w=8,
            h=9,
        )


KINDS = ("sql", "tcp", "dns", "grpc", "browser")  # the kinds with a panel of their own


def _kind_phases(kind: str, sel: str) -> str:
    """p95 of each phase of the `kind` hops: the phase histogram has no kind, variant or
    location label, so its hops are those of the kind's step-duration series (`and on`)."""
    hops = hops_of(f'kind="{kind}", {sel}')
    phases = rate("hopwatch_http_phase_duration_seconds_bucket", 'flow=~"$flow"')
    classic = (
        f"histogram_quantile(0.95, sum by (flow, step, phase, le)"
        f" ({phases} and on (flow, step) {hops}))"
    )
    native_phases = rate("hopwatch_http_phase_duration_seconds", 'flow=~"$flow"')
    native = (
        f"histogram_quantile(0.95, sum by (flow, step, phase)"
        f" ({native_phases} and on (flow, step) {hops}))"
    )
    return f"({classic} or {native})"


def hops_of(sel: str) -> str:
    """One series per hop matching `sel`, to select other series' hops with `and on`: the
    step-duration histogram's _count, or the native histogram itself (no _count there)."""
    return f"({STEP_DURATION}_count{{{sel}}} or {STEP_DURATION}{{{sel}}})"


def _overview_kinds(lay: Layout, sel: str) -> None:
    """What the kinds beyond HTTP and messaging export: their hops' latency and failures (the
    series carry `kind`), the phases tcp and browser steps time, certificates of tcp and grpc
    hops, and the shared browser's own figures."""
    lay.row("Step kinds: sql, tcp, dns, grpc, browser")
    kinds = f'kind=~"{"|".join(KINDS)}", {sel}'
    lay.add(
        timeseries(
            "Hop latency p95 by kind",
            "95th percentile of the latency of every hop of each kind"
            " (hopwatch_step_duration_seconds by its kind label).",
            [target(quantile("0.95", "kind", STEP_DURATION, kinds), "{{kind}}")],
            "s",
        ),
        w=12,
        h=8,
    )
    lay.add(
        timeseries(
            "Broken links by kind and reason",
            "Failures per interval of the hops of each kind, by reason (sql: connect_error,"
            " timeout, assertion, extract; dns: an rcode or answer not wanted is assertion,"
            " a server name that does not resolve dns_error; grpc: a status not wanted is"
            " assertion, a failed certificate check its reason).",
            [target(f"sum by (kind, reason) {failures(kinds)}", "{{kind}} · {{reason}}")],
            "short",
            bars=True,
            stack=True,
        ),
        w=12,
        h=8,
    )
    what = {
        "sql": ("SQL: time to the row p95", "a sql hop's query; a polling one (`until`) from"
                " its first query to the one that found the row: how late the data landed"),
        "dns": ("DNS: answer time p95", "a dns hop's question to its answer"),
        "grpc": ("gRPC: call latency p95", "a grpc hop's call to its answer (reflection,"
                 " learnt once, and the certificate check are not in it)"),
    }  # fmt: skip
    for kind, (title, latency) in what.items():
        lay.add(
            timeseries(
                title,
                f"95th percentile per hop of {latency} (hopwatch_step_duration_seconds"
                f'{{kind="{kind}"}}); the points are exemplars: click one for its trace.',
                [
                    target(
                        quantile("0.95", "flow, step", STEP_DURATION, f'kind="{kind}", {sel}'),
                        HOP_LEGEND,
                        exemplar=True,
                    )
                ],
                "s",
            ),
            w=8,
            h=8,
        )
    lay.add(
        timeseries(
            "TCP: DNS, connect and TLS p95",
            "95th percentile of each phase of the tcp hops (name lookup, connect, TLS or"
            " STARTTLS handshake), from hopwatch_http_phase_duration_seconds: only for flows"
            " that export phases (`http_phases: true`, or settings.metrics.http_phases).",
            [target(_kind_phases("tcp", sel), "{{flow}}: {{step}} · {{phase}}")],
            "s",
        ),
        w=12,
        h=8,
    )
    left = (
        "min by (flow, step) (hopwatch_tls_cert_expiry_timestamp_seconds"
        f"{{{sel}}} and on (flow, step, variant, location) "
        + hops_of('kind=~"tcp|grpc", ' + sel)
        + ") - time()"
    )
    lay.add(
        timeseries(
            "TCP and gRPC: certificate time left",
            "Time left on the server certificate each tcp and grpc hop over TLS saw"
            " (hopwatch_tls_cert_expiry_timestamp_seconds; a grpc hop reads it by a handshake"
            " of its own at most every 5 minutes). A rotation shows as a jump up.",
            [target(left, HOP_LEGEND)],
            "s",
            threshold_steps=((None, "red"), (3 * 86400, "orange"), (14 * 86400, "green")),
        ),
        w=12,
        h=8,
    )
    lay.add(
        timeseries(
            "Browser: phases p95",
            "95th percentile of each phase of the browser hops: setup (a fresh context),"
            " navigation, actions, network (requests the page made), from"
            " hopwatch_http_phase_duration_seconds: only for flows that export phases.",
            [target(_kind_phases("browser", sel), "{{flow}}: {{step}} · {{phase}}")],
            "s",
        ),
        w=12,
        h=8,
    )
    lay.add(
        timeseries(
            "Browser: shared Chromium memory",
            "Memory of the monitor's one Chromium (PSS of its processes,"
            " hopwatch_browser_memory_bytes), per monitor: not per flow, the selection does"
            " not apply. 0 while no browser step has started it.",
            [target("max by (instance) (hopwatch_browser_memory_bytes)", "{{instance}}")],
            "bytes",
        ),
        w=4,
        h=8,
    )
    lay.add(
        timeseries(
            "Browser: steps and restarts",
            "Browser steps holding a slot and waiting for one (at most"
            " HOPWATCH_BROWSER_CONCURRENCY run at once; waiting counts against a step's time),"
            " and restarts of a Chromium that went away, per monitor.",
            targets(
                ("sum by (instance) (hopwatch_browser_steps_running)", "{{instance}} running"),
                ("sum by (instance) (hopwatch_browser_steps_waiting)", "{{instance}} waiting"),
                (
                    "sum by (instance) (increase(hopwatch_browser_restarts_total[$__range]))",
                    "{{instance}} restarts in range",
                ),
            ),
            "short",
        ),
        w=8,
        h=8,
    )


def _overview_arrivals(lay: Layout) -> None:
    lay.row("Arrivals")
    for source, what in (("webhook", "Webhook requests"), ("kafka", "Kafka messages")):
        arrivals = rate("hopwatch_arrivals_total", f'source="{source}"')
        lay.add(
            timeseries(
                f"{what} by outcome",
                f"{what} reaching the monitor, by outcome: bad_signature means forged or wrongly"
                " signed, unmatched means no run was waiting for it.",
                [target(f"sum by (outcome) ({arrivals})", "{{outcome}}")],
                "ops",
                stack=True,
            ),
            w=12,
            h=8,
        )


def _overview_slo(lay: Layout, sel: str) -> None:
    lay.row("SLO burn")
    for slo, record, what in (
        ("availability_slo", "hopwatch:run_errors", "Availability"),
        ("latency_slo", "hopwatch:run_slow", "Latency"),
    ):
        lay.add(
            timeseries(
                f"{what} error-budget burn rate",
                f"Burn rate = bad-run ratio / (1 - SLO), from the recording rules"
                f" {record}:ratio_rate*. The alerts page at 14.4x over 1h (and 5m) or 6x over"
                " 6h (and 30m).",
                targets(
                    *(
                        (
                            f"{record}:ratio_rate{w}{{{sel}}} / (1 - ${slo})",
                            f"{{{{flow}}}} · {{{{variant}}}} {w}",
                        )
                        for w in ("1h", "6h")
                    )
                ),
                "x",
                threshold_steps=((None, "green"), (6, "orange"), (14.4, "red")),
            ),
            w=12,
            h=8,
        )


def _monitor_health(lay: Layout) -> None:
    lay.row("Monitor self-health")
    loop_lag = "hopwatch_event_loop_lag_seconds"
    lay.add(
        timeseries(
            "Event-loop lag",
            "How late the monitor's event loop runs its callbacks: a busy monitor inflates"
            " every latency it measures.",
            targets(
                (quantile("0.99", "instance", loop_lag, ""), "{{instance}} p99"),
                (ratio("instance", loop_lag, ""), "{{instance}} mean"),
            ),
            "s",
            threshold_steps=((None, "green"), (0.1, "red")),
        ),
        w=8,
        h=8,
    )
    lay.add(
        timeseries(
            "Scheduler lag",
            "How late runs start after their scheduled time.",
            [
                target(
                    quantile("0.99", "instance", "hopwatch_scheduler_lag_seconds", ""),
                    "{{instance}} p99",
                )
            ],
            "s",
            threshold_steps=((None, "green"), (5, "red")),
        ),
        w=8,
        h=8,
    )
    lay.add(
        timeseries(
            "Runs finished",
            "Runs finished per second by monitor instance; zero everywhere is what the dead"
            " man's switch HopwatchNoRunsRecorded pages on.",
            [target(f"sum by (instance) ({rate('hopwatch_runs_total', '')})", "{{instance}}")],
            "ops",
        ),
        w=8,
        h=8,
    )
    lay.add(
        timeseries(
            "Sink errors",
            "Run results a sink failed to take (store, traces, results topic); probing goes on.",
            [
                target(
                    f"sum by (instance, sink) ({rate('hopwatch_sink_errors_total', '')})",
                    "{{instance}} {{sink}}",
                )
            ],
            "ops",
        ),
        w=12,
        h=6,
    )
    lay.add(
        table(
            "Monitor versions",
            "hopwatch_build_info: which version each instance runs.",
            [instant_table_target("max by (instance, version) (hopwatch_build_info)")],
            "none",
        ),
        w=12,
        h=6,
    )


def _cluster(lay: Layout) -> None:
    """Replicas sharing the flows (`hopwatch run --cluster`); empty for a single process."""
    lay.row("Cluster")
    lay.add(
        timeseries(
            "Members",
            "Replicas in the group as each replica saw it at its last rebalance; and members"
            " whose flow set differs from the reporting replica's (should be 0: every replica"
            " must load the same flow files).",
            targets(
                ("max by (instance) (hopwatch_cluster_members)", "{{instance}}"),
                ("max(hopwatch_cluster_flow_set_mismatch)", "members with other flows"),
            ),
            "none",
        ),
        w=8,
        h=8,
    )
    owned = timeseries(
        "Owned flows per replica",
        "Flows each replica schedules now, stacked, against the flows the files configure: the"
        " stack must reach the line (HopwatchClusterFlowsUnowned pages when it does not).",
        targets(
            ("sum by (instance) (hopwatch_cluster_owned_flows)", "{{instance}}"),
            ("max(hopwatch_cluster_flows)", "configured"),
        ),
        "none",
        stack=True,
    )
    owned["fieldConfig"]["overrides"] = [
        {
            "matcher": {"id": "byFrameRefID", "options": "B"},
            "properties": [
                {"id": "custom.stacking", "value": {"mode": "none", "group": "A"}},
                {"id": "custom.fillOpacity", "value": 0},
                {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
            ],
        }
    ]
    lay.add(owned, w=8, h=8)
    lay.add(
        timeseries(
            "Rebalances",
            "Rebalances each replica took part in: one per replica joining or leaving (a"
            " rolling restart makes two per pod); a steady stream means replicas flap.",
            [
                target(
                    "sum by (instance) "
                    f"({rate('hopwatch_cluster_rebalances_total', '', 'increase')})",
                    "{{instance}}",
                )
            ],
            "none",
            bars=True,
        ),
        w=8,
        h=8,
    )
    lay.add(
        timeseries(
            "Forwarded arrivals",
            "Webhooks a replica received for a flow another replica owns, sent to the owner"
            " over the control topic (sent, failed), and control records that were not"
            " arrivals (malformed). Each is counted in hopwatch_arrivals_total once, by its owner.",
            [
                target(
                    "sum by (instance, outcome) "
                    f"({rate('hopwatch_cluster_forwarded_arrivals_total', '')})",
                    "{{instance}} {{outcome}}",
                )
            ],
            "ops",
        ),
        w=12,
        h=8,
    )
    delay = "hopwatch_cluster_forward_delay_seconds"
    lay.add(
        timeseries(
            "Forwarding delay",
            "From a webhook reaching one replica to its owner offering it to the waiting run:"
            " what forwarding adds (the webhook's latency is stamped where it arrived).",
            targets(
                (quantile("0.5", "instance", delay, ""), "{{instance}} p50"),
                (quantile("0.99", "instance", delay, ""), "{{instance}} p99"),
            ),
            "s",
        ),
        w=12,
        h=8,
    )


def flow_detail() -> dict[str, Any]:
    """One flow in depth: runs, per-hop latency with trace exemplars, HTTP phases, variants."""
    lay = Layout()
    _flow_now(lay)
    _flow_runs(lay)
    _flow_hops(lay)
    _flow_http(lay)
    _flow_variants(lay)
    _flow_locations(lay)
    variables = [
        datasource_variable(),
        query_variable("flow", "Flow", "label_values(hopwatch_runs_total, flow)", multi=False),
        query_variable(
            "variant", "Variant", 'label_values(hopwatch_runs_total{flow="$flow"}, variant)'
        ),
        query_variable(
            "location",
            "Location",
            'label_values(hopwatch_runs_total{flow="$flow", variant=~"$variant"}, location)',
        ),
        query_variable(
            # link_up: a hop's latency may be a native histogram, without a _count series
            "step",
            "Hop",
            'label_values(hopwatch_link_up{flow="$flow"}, step)',
        ),
        *SLO_CONSTANTS,
    ]
    return dashboard(
        "hopwatch-flow",
        "hopwatch / flow",
        "One flow: its runs, each hop's latency with exemplars linking to traces, HTTP phases,"
        " stable and canary side by side.",
        variables,
        lay,
    )


def _flow_now(lay: Layout) -> None:
    lay.row("Now")
    where = "{{variant}} · {{location}}"
    lay.add(
        up_stat(
            "Up",
            "Whether the last run succeeded, per variant and location.",
            f"max by (variant, location) (hopwatch_flow_up{{{FLOW_SEL}}})",
            where,
        ),
        w=6,
        h=5,
    )
    last_ok = f"hopwatch_last_success_timestamp_seconds{{{FLOW_SEL}}}"
    lay.add(
        since_good_stat(
            "Time since the flow last succeeded.",
            f"time() - max by (variant, location) ({last_ok})",
            where,
        ),
        w=6,
        h=5,
    )
    lay.add(
        success_stat(
            "Successful / finished runs over the time range.", "variant", FLOW_SEL, "{{variant}}"
        ),
        w=6,
        h=5,
    )
    errors_1h = f"hopwatch:run_errors:ratio_rate1h{{{FLOW_SEL}}}"
    lay.add(
        stat(
            "Availability budget burn (1h)",
            "Failed-run ratio over the last hour / (1 - availability SLO); above 14.4 it pages,"
            " with the 5m window.",
            [target(f"max by (variant) ({errors_1h}) / (1 - $availability_slo)", "{{variant}}")],
            "x",
            threshold_steps=((None, "green"), (1, "orange"), (14.4, "red")),
        ),
        w=6,
        h=5,
    )


def _flow_runs(lay: Layout) -> None:
    lay.row("Runs")
    runs = rate("hopwatch_runs_total", FLOW_SEL, "increase")
    lay.add(
        timeseries(
            "Runs by outcome",
            "Runs finished per interval, by variant and outcome.",
            [target(f"sum by (variant, outcome) ({runs})", "{{variant}} {{outcome}}")],
            "short",
            bars=True,
            stack=True,
        ),
        w=12,
        h=8,
    )
    lay.add(
        timeseries(
            "Run duration",
            "End-to-end run duration, p50 and p95, per variant.",
            targets(
                (quantile("0.5", "variant", RUN_DURATION, FLOW_SEL), "{{variant}} p50"),
                (quantile("0.95", "variant", RUN_DURATION, FLOW_SEL), "{{variant}} p95"),
            ),
            "s",
        ),
        w=12,
        h=8,
    )
    lay.add(
        link_history(
            "Link health",
            "Each hop's state after every run: green passed, red failed, grey skipped after an"
            " earlier hop broke.",
            [target(link_state("step, variant", STEP_SEL), "{{step}} · {{variant}}")],
        ),
        w=12,
        h=8,
    )
    lay.add(
        timeseries(
            "Broken links by hop and reason",
            "The first failing hop of each broken run and why it failed.",
            [target(f"sum by (step, reason) {failures(STEP_SEL)}", "{{step}}: {{reason}}")],
            "short",
            bars=True,
            stack=True,
        ),
        w=12,
        h=8,
    )
    cleanups = rate("hopwatch_cleanup_failures_total", FLOW_SEL, "increase")
    lay.add(
        timeseries(
            "Cleanup failures",
            "Cleanup steps that failed: what those runs created is left behind in the systems"
            " under watch. Not counted as broken links.",
            [target(f"sum by (step, variant) ({cleanups})", "{{step}} · {{variant}}")],
            "short",
            bars=True,
            stack=True,
        ),
        w=24,
        h=6,
    )


def _flow_hops(lay: Layout) -> None:
    lay.row("Per-hop latency")
    lay.add(
        heatmap(
            "Latency of $step",
            "Latency distribution of the hop over time; the dots are exemplars: click one to"
            " open the trace of that run.",
            [
                target(
                    distribution(STEP_DURATION, STEP_SEL),
                    "{{le}}",
                    format="heatmap",
                    exemplar=True,
                )
            ],
        ),
        w=24,  # the repeat gives each hop a third of the row
        h=9,
        repeat="step",
        repeatDirection="h",
        maxPerRow=3,
    )
    lay.add(
        timeseries(
            "Hop latency p95",
            "95th percentile of each hop's latency; the points are exemplars linking to traces.",
            [target(quantile("0.95", "step", STEP_DURATION, STEP_SEL), "{{step}}", exemplar=True)],
            "s",
        ),
        w=12,
        h=8,
    )
    own = "hopwatch_step_own_duration_seconds"
    lay.add(
        timeseries(
            "Waiting hops: own latency p95",
            "A waiting hop (webhook, Kafka record) is timed from its trigger's start, so its"
            " latency contains the hops before it; this is its own part, from the previous"
            " step's end to the arrival: the figure that moves when this hop changed. Every"
            " waiting hop of the flow (the others have no own part).",
            [target(quantile("0.95", "step", own, FLOW_SEL), "{{step}}", exemplar=True)],
            "s",
        ),
        w=12,
        h=8,
    )


def _flow_http(lay: Layout) -> None:
    lay.row("HTTP phases")
    # the phase histogram has no variant or location labels: it is filtered by flow and hop only
    phase_sel = 'flow="$flow", step=~"$step"'
    phases = "hopwatch_http_phase_duration_seconds"
    lay.add(
        timeseries(
            "HTTP phase timings (mean, stacked)",
            "Where an HTTP hop's time goes: DNS, connect, TLS, server processing, transfer."
            " The stacked means add up to the hop's mean. Only for flows that export them"
            " (`http_phases: true` in the flow, or settings.metrics.http_phases).",
            [target(ratio("step, phase", phases, phase_sel), "{{step}} · {{phase}}")],
            "s",
            stack=True,
        ),
        w=12,
        h=8,
    )
    lay.add(
        timeseries(
            "HTTP phase p95",
            "95th percentile of each phase of each HTTP hop.",
            [target(quantile("0.95", "step, phase", phases, phase_sel), "{{step}} · {{phase}}")],
            "s",
        ),
        w=12,
        h=8,
    )


def _flow_variants(lay: Layout) -> None:
    lay.row("Variants side by side")
    var_sel = 'flow="$flow", variant=~"$variant", location=~"$location"'
    # Grafana lays a horizontally repeated panel out across a whole row, one copy per variant
    side_by_side = {"repeat": "variant", "repeatDirection": "h", "maxPerRow": 2}
    lay.add(
        timeseries(
            "Hop latency p95 · $variant",
            "Each hop's p95 for one variant; the panel repeats per selected variant.",
            [target(quantile("0.95", "step", STEP_DURATION, var_sel), "{{step}}", exemplar=True)],
            "s",
        ),
        w=24,
        h=8,
        **side_by_side,
    )
    runs = rate("hopwatch_runs_total", var_sel, "increase")
    lay.add(
        timeseries(
            "Runs by outcome · $variant",
            "Runs per interval by outcome for one variant; the panel repeats per selected variant.",
            [target(f"sum by (outcome) ({runs})", "{{outcome}}")],
            "short",
            bars=True,
            stack=True,
        ),
        w=24,
        h=8,
        **side_by_side,
    )
    _flow_gate(lay)
    canary = quantile("0.95", "step", STEP_DURATION, var_sel.replace('~"$variant"', '"canary"'))
    stable = quantile("0.95", "step", STEP_DURATION, var_sel.replace('~"$variant"', '"stable"'))
    lay.add(
        timeseries(
            "Canary / stable hop latency p95",
            "Per hop, the canary's p95 divided by the stable one's (variants named canary and"
            " stable): above 1 the canary is slower.",
            [target(f"{canary} / {stable}", "{{step}}")],
            "x",
            threshold_steps=((None, "green"), (1.2, "orange"), (2, "red")),
        ),
        w=24,
        h=8,
    )


def _flow_gate(lay: Layout) -> None:
    """What the canary gate answered about this flow (hopwatch gate, Argo Rollouts, Flagger)."""
    verdicts = rate("hopwatch_gate_verdicts_total", 'flow="$flow"', "increase")
    lay.add(
        timeseries(
            "Canary gate verdicts",
            "Verdicts the canary gate gave on this flow (pass, marginal, fail, inconclusive).",
            [target(f"sum by (verdict) ({verdicts})", "{{verdict}}")],
            "short",
            bars=True,
            stack=True,
        ),
        w=12,
        h=8,
    )
    lay.add(
        stat(
            "Canary gate score",
            "Score (0-100) of the last gate verdict on this flow that had one.",
            [target('max by (flow) (hopwatch_gate_score{flow="$flow"})', "score")],
            "none",
            threshold_steps=((None, "red"), (75, "orange"), (95, "green")),
        ),
        w=12,
        h=8,
    )


def _overview_maintenance(lay: Layout, sel: str) -> None:
    """When flows were in a maintenance window: their runs count for no alert and no SLO."""
    lay.row("Maintenance")
    panel = status_history(
        "Maintenance windows",
        "Flow variants in a maintenance window (hopwatch_maintenance 1): their runs go on and"
        " show on every other panel, but open no incident, raise no alert and stay out of the"
        " SLO ratios.",
        [
            target(
                # hopwatch_maintenance appears with a flow's first window: 0 for the others
                f"max by (flow, variant, location) (hopwatch_maintenance{{{sel}}})"
                f" or 0 * max by (flow, variant, location) (hopwatch_flow_up{{{sel}}})",
                "{{flow}} · {{variant}} · {{location}}",
            )
        ],
    )
    panel["fieldConfig"]["defaults"]["mappings"] = [
        {
            "type": "value",
            "options": {
                "0": {"text": "-", "color": "transparent", "index": 0},
                "1": {"text": "MAINTENANCE", "color": "blue", "index": 1},
            },
        }
    ]
    panel["fieldConfig"]["defaults"]["thresholds"] = thresholds((None, "transparent"), (1, "blue"))
    lay.add(panel, w=24, h=6)


def _flow_locations(lay: Layout) -> None:
    """The flow as each location sees it, side by side, and how many see each link broken
    (the quorum HopwatchLinkBrokenInLocations pages on)."""
    lay.row("Locations side by side")
    loc_sel = 'flow="$flow", variant=~"$variant", location="$location"'
    side_by_side = {"repeat": "location", "repeatDirection": "h", "maxPerRow": 3}
    lay.add(
        link_history(
            "Link states · $location",
            "Each hop's state from one location; the panel repeats per selected location.",
            [target(link_state("step, variant", loc_sel), "{{step}} · {{variant}}")],
        ),
        w=24,
        h=6,
        **side_by_side,
    )
    lay.add(
        timeseries(
            "Hop latency p95 · $location",
            "Each hop's p95 from one location; the panel repeats per selected location.",
            [
                target(
                    quantile("0.95", "step, variant", STEP_DURATION, loc_sel),
                    "{{step}} · {{variant}}",
                )
            ],
            "s",
        ),
        w=24,
        h=8,
        **side_by_side,
    )
    quorum = 'flow="$flow", variant=~"$variant"'
    broken = f"hopwatch:link_broken:locations{{{quorum}}}"
    reporting = f"hopwatch:link_reporting:locations{{{quorum}}}"
    lay.add(
        timeseries(
            "Locations seeing each link broken",
            "Per hop, how many locations see it broken, out of how many run it (recording rules"
            " of deploy/prometheus/rules/locations.yml); HopwatchLinkBrokenInLocations pages"
            " when a majority of at least 2 do.",
            [
                target(f"{broken} or 0 * {reporting}", "{{step}} · {{variant}} broken"),
                target(reporting, "{{step}} · {{variant}} reporting", "B"),
            ],
            "short",
        ),
        w=24,
        h=8,
    )


DASHBOARDS = {"hopwatch-overview.json": overview, "hopwatch-flow.json": flow_detail}


def render(build: Any) -> str:
    """The JSON text committed for one dashboard."""
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def rendered() -> Iterator[tuple[Path, str]]:
    for name, build in DASHBOARDS.items():
        yield DASHBOARD_DIR / name, render(build)


CONFIGMAP_HEADER = """\
# Generated by grafana/generate.py from grafana/dashboards/*.json: edit the generator and run it.
# Grafana's dashboard sidecar (the Grafana and kube-prometheus-stack Helm charts' default label
# grafana_dashboard) loads every JSON key as a board. It carries no namespace: apply it where
# the sidecar looks (deploy/README.md). The grafana_folder annotation names the folder for a
# sidecar whose folderAnnotation is grafana_folder; others put the boards in their default folder.
"""


def configmap(boards: Iterable[tuple[Path, str]]) -> str:
    """The dashboards as one ConfigMap, each JSON text a literal block (kept byte for byte)."""
    lines = [
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: hopwatch-dashboards",
        "  labels:",
        "    app.kubernetes.io/name: hopwatch",
        "    app.kubernetes.io/part-of: hopwatch",
        '    grafana_dashboard: "1"',
        "  annotations:",
        "    grafana_folder: hopwatch",
        "data:",
    ]
    for path, text in sorted(boards):
        lines.append(f"  {path.name}: |")
        lines.extend(f"    {line}" for line in text.splitlines())
    return CONFIGMAP_HEADER + "\n".join(lines) + "\n"


def main() -> int:
    DASHBOARD_DIR.mkdir(exist_ok=True)
    boards = list(rendered())
    for path, text in boards:
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    CONFIGMAP.parent.mkdir(exist_ok=True)
    CONFIGMAP.write_text(configmap(boards), encoding="utf-8")
    print(f"wrote {CONFIGMAP}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
