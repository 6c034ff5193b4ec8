"""The canary gate's one entry point: gather samples (a burst now, or the store's window), judge
each flow canary against baseline, count the verdict, and answer in one shape for every caller.

`hopwatch gate`, GET /api/v1/gate (Argo Rollouts) and POST /api/v1/gate/flagger all call
:func:`evaluate`; what each makes of the verdict is in :mod:`monitor.gate.models`. With several
flows, the gate's verdict is the worst of theirs in the order fail > inconclusive > marginal >
pass, and its score the lowest.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from monitor.config import Config, Flow
from monitor.gate.judge import judge
from monitor.gate.models import FlowGate, GateError, GateRequest, GateResult, SourceUnavailable
from monitor.gate.samples import (
    FLOW_DURATION,
    FLOW_ERROR_RATIO,
    RunSummaryLike,
    StepSamplesLike,
    VariantObservations,
    from_runs,
    from_store,
    hop_metric,
    metric_samples,
)
from monitor.gate.verdict import Verdict, VerdictName
from monitor.results import RunResult

__all__ = [
    "GateEngine",
    "GateMetrics",
    "SampleStore",
    "evaluate",
    "gate_metrics",
]

STORE_PAGE = 1000
MAX_STORE_PAGES = 200  # 200k runs per variant: far beyond any sensible window, and bounded
VERDICTS: tuple[VerdictName, ...] = ("pass", "marginal", "fail", "inconclusive")
# Worst first: evidence of harm beats missing evidence, which beats a weak pass.
SEVERITY: dict[VerdictName, int] = {"fail": 3, "inconclusive": 2, "marginal": 1, "pass": 0}


# --- metrics ----------------------------------------------------------------------------------


class GateMetrics:
    """hopwatch_gate_verdicts_total{flow,verdict} and hopwatch_gate_score{flow}."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.verdicts = Counter(
            "hopwatch_gate_verdicts",
            "Canary gate verdicts by flow.",
            ["flow", "verdict"],
            registry=registry,
        )
        self.score = Gauge(
            "hopwatch_gate_score",
            "Score (0-100) of the last canary gate verdict that had one, by flow.",
            ["flow"],
            registry=registry,
        )

    def record(self, flow: str, verdict: Verdict) -> None:
        # Every verdict's series exists from the first gate on, so rate() and absent() behave.
        for name in VERDICTS:
            self.verdicts.labels(flow, name)
        self.verdicts.labels(flow, verdict.verdict).inc()
        if verdict.score is not None:
            self.score.labels(flow).set(verdict.score)


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, GateMetrics] = weakref.WeakKeyDictionary()


def gate_metrics(registry: CollectorRegistry) -> GateMetrics:
    """The gate's instruments on `registry`, created once per registry however often asked."""
    found = _METRICS.get(registry)
    if found is None:
        found = _METRICS[registry] = GateMetrics(registry)
    return found


# --- sources ----------------------------------------------------------------------------------


class GateEngine(Protocol):
    """What the gate uses of the engine (monitor.engine.Engine satisfies it): the flows it knows,
    the registry its metrics go on, and one-shot runs for bursts. The engine serves the gate's
    routes, so the gate names this protocol rather than importing the engine."""

    @property
    def config(self) -> Config: ...

    @property
    def registry(self) -> CollectorRegistry: ...

    async def run_once(
        self, pairs: Sequence[tuple[Flow, str]], repeat: int, concurrency: int
    ) -> list[RunResult]: ...


class SampleStore(Protocol):
    """What the window source needs of the store (monitor.store.Store satisfies it)."""

    async def samples(
        self, flow: str, variant: str, since: float, until: float, *, location: str | None = None
    ) -> dict[str, Any]: ...

    async def list_runs(
        self,
        *,
        flow: str | None = None,
        variant: str | None = None,
        location: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Any: ...


def _resolve_flows(request: GateRequest, engine: GateEngine | None) -> list[str]:
    """The flow names to judge, checked against the config when there is one."""
    wanted = (request.canary, request.baseline)
    if engine is None:
        if not request.flow:
            raise GateError("name the flow(s) to judge: without a config they cannot be listed")
        return list(dict.fromkeys(request.flow))
    flows = {f.name: f for f in engine.config.flows}
    if not request.flow:
        names = [n for n, f in flows.items() if all(v in f.variants for v in wanted)]
        if not names:
            raise GateError(
                f"no flow has both variants {request.canary!r} and {request.baseline!r}"
            )
        return names
    for name in request.flow:
        _check_flow(flows.get(name), name, wanted, flows)
    return list(dict.fromkeys(request.flow))


def _check_flow(
    flow: Flow | None, name: str, wanted: Sequence[str], flows: dict[str, Flow]
) -> None:
    if flow is None:
        known = ", ".join(sorted(flows)) or "none"
        raise GateError(f"unknown flow {name!r}; known flows: {known}")
    missing = [v for v in wanted if v not in flow.variants]
    if missing:
        has = ", ".join(flow.variants)
        raise GateError(f"flow {name!r} has no variant {missing[0]!r} (it has: {has})")


Observed = dict[str, tuple[VariantObservations, VariantObservations]]


async def _burst(request: GateRequest, engine: GateEngine | None, names: Sequence[str]) -> Observed:
    if engine is None:
        raise GateError("a burst runs the flows, which needs the monitor's engine")
    assert request.burst is not None
    pairs = [
        (engine.config.flow(name), variant)
        for name in names
        for variant in (request.baseline, request.canary)
    ]
    # One discarded round first: the first run of a variant pays for cold caches (templates,
    # DNS, the target's own warm-up); measured, it would bias whichever variant ran first.
    await engine.run_once(pairs, repeat=1, concurrency=request.concurrency)
    results = await engine.run_once(pairs, repeat=request.burst, concurrency=request.concurrency)
    return {
        name: (
            from_runs(results, name, request.canary),
            from_runs(results, name, request.baseline),
        )
        for name in names
    }


async def _all_runs(
    store: SampleStore, flow: str, variant: str, since: float, until: float, location: str | None
) -> list[RunSummaryLike]:
    runs: list[RunSummaryLike] = []
    cursor: str | None = None
    for _ in range(MAX_STORE_PAGES):
        page = await store.list_runs(
            flow=flow,
            variant=variant,
            location=location,
            since=since,
            until=until,
            limit=STORE_PAGE,
            cursor=cursor,
        )
        runs.extend(page.runs)
        cursor = page.next_cursor
        if cursor is None:
            break
    return runs


async def _window_side(
    store: SampleStore,
    request: GateRequest,
    flow: str,
    variant: str,
    span: tuple[float, float],
    hops: Sequence[tuple[str, str]],
) -> VariantObservations:
    since, until = span
    steps: dict[str, StepSamplesLike] = await store.samples(
        flow, variant, since, until, location=request.location
    )
    runs = await _all_runs(store, flow, variant, since, until, request.location)
    return from_store(flow, variant, steps, runs, hops)


async def _window(
    request: GateRequest,
    store: SampleStore | None,
    engine: GateEngine | None,
    names: Sequence[str],
    span: tuple[float, float],
) -> Observed:
    if store is None:
        raise GateError("a window reads past runs from the store, and this monitor has none")
    observed: Observed = {}
    try:
        for name in names:
            # The config's hops, in order, so links read as the flow does and a hop without
            # runs still shows; without a config the store's order (first seen) stands.
            flow = engine.config.flow(name) if engine else None
            hops = [(s.name, s.kind) for s in flow.steps] if flow else []
            canary = await _window_side(store, request, name, request.canary, span, hops)
            baseline = await _window_side(store, request, name, request.baseline, span, hops)
            observed[name] = (canary, baseline)
    except Exception as exc:  # whatever the database driver raises: we could not measure
        raise SourceUnavailable(f"the store could not be read: {exc}") from exc
    return observed


# --- judging ----------------------------------------------------------------------------------


def _combine(
    request: GateRequest, flows: Sequence[FlowGate]
) -> tuple[VerdictName, float | None, list[str]]:
    verdict = max((f.verdict.verdict for f in flows), key=SEVERITY.__getitem__)
    scores = [f.verdict.score for f in flows if f.verdict.score is not None]
    score = min(scores) if scores else None
    reasons = [f"{f.flow}: {reason}" for f in flows for reason in f.verdict.reasons]
    if verdict == "marginal" and request.allow_marginal:
        reasons.insert(0, "warning: marginal verdict let through (allow_marginal)")
    return verdict, score, reasons


def _check_critical(critical: set[str], known: set[str]) -> None:
    """A misspelt critical metric would silently guard nothing: refuse it instead."""
    unknown = sorted(critical - known)
    if unknown:
        raise GateError(
            f"critical metric {unknown[0]!r} is not among this gate's metrics: "
            + ", ".join(sorted(known))
        )


def _config_metrics(engine: GateEngine, names: Sequence[str]) -> set[str]:
    hops = {s.name for name in names for s in engine.config.flow(name).steps}
    kinds = ("latency", "error_ratio")
    return {hop_metric(h, k) for h in hops for k in kinds} | {FLOW_DURATION, FLOW_ERROR_RATIO}


def judge_flows(request: GateRequest, observed: Observed) -> list[FlowGate]:
    """Judge each flow's canary against its baseline."""
    config = request.judge_config()
    critical = set(request.critical)
    inputs = {name: metric_samples(c, b, critical) for name, (c, b) in observed.items()}
    _check_critical(critical, {m.name for metrics in inputs.values() for m in metrics})
    return [
        FlowGate(name, judge(metrics, config), observed[name][0].runs, observed[name][1].runs)
        for name, metrics in inputs.items()
    ]


async def evaluate(
    request: GateRequest,
    *,
    engine: GateEngine | None,
    store: Any | None,
    registry: CollectorRegistry | None = None,
) -> GateResult:
    """Gather samples as the request says, judge every flow, count the verdicts, answer.

    A burst needs a started `engine` (its runs go to the engine's sinks like any other run);
    a window needs the `store`, and uses the engine's config (when given) to check the flow
    names. The metrics go on `registry`, by default the engine's. Raises GateError for a
    request that cannot be answered and SourceUnavailable when the store cannot be read.
    """
    started = time.monotonic()
    names = _resolve_flows(request, engine)
    if engine is not None:  # before a burst is spent on it
        _check_critical(set(request.critical), _config_metrics(engine, names))
    since = until = None
    if request.burst is not None:
        observed = await _burst(request, engine, names)
    else:
        assert request.window is not None
        until = request.until if request.until is not None else time.time()
        since = until - request.window
        observed = await _window(request, store, engine, names, (since, until))
    flows = judge_flows(request, observed)
    registry = registry if registry is not None else (engine.registry if engine else None)
    if registry is not None:
        metrics = gate_metrics(registry)
        for gate in flows:
            metrics.record(gate.flow, gate.verdict)
    verdict, score, reasons = _combine(request, flows)
    return GateResult(
        request=request,
        verdict=verdict,
        score=score,
        reasons=reasons,
        flows=flows,
        since=since,
        until=until,
        elapsed_s=time.monotonic() - started,
    )
