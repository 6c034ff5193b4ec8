"""The canary gate's one entry point: gather samples (a burst now, or the store's window), judge
each flow canary against baseline, count the verdict, and answer in one shape for every caller.

`hopwatch gate`, GET /api/v1/gate (Argo Rollouts) and POST /api/v1/gate/flagger all call
:func:`evaluate`. Verdicts and what callers make of them:

* ``pass`` — exit 0, Flagger 200;
* ``marginal`` — the score is between the thresholds: not good enough to take more traffic, so
  exit 1 and Flagger 412, unless the request says ``allow_marginal`` (then exit 0 / 200 with a
  warning among the reasons);
* ``fail`` — exit 1, Flagger 412;
* ``inconclusive`` — too few samples to tell: exit 3, Flagger 412 (Flagger has no "wait").

With several flows, the gate's verdict is the worst of theirs in the order
fail > inconclusive > marginal > pass, and its score the lowest.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from monitor.config import Flow
from monitor.gate.judge import JudgeConfig, Verdict, VerdictName, judge
from monitor.gate.samples import (
    DEFAULT_CRITICAL,
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
from probes.durations import Duration

if TYPE_CHECKING:  # the engine imports the gate routes
    from monitor.engine import Engine

__all__ = [
    "EXIT_CODES",
    "MAX_BURST",
    "MAX_CONCURRENCY",
    "FlowGate",
    "GateError",
    "GateMetrics",
    "GateRequest",
    "GateResult",
    "SampleStore",
    "SourceUnavailable",
    "evaluate",
    "gate_metrics",
]

MAX_BURST = 1000  # runs per variant and flow; a gate is a check, not a load test
MAX_CONCURRENCY = 64
STORE_PAGE = 1000
MAX_STORE_PAGES = 200  # 200k runs per variant: far beyond any sensible window, and bounded
VERDICTS: tuple[VerdictName, ...] = ("pass", "marginal", "fail", "inconclusive")
# Worst first: evidence of harm beats missing evidence, which beats a weak pass.
SEVERITY: dict[VerdictName, int] = {"fail": 3, "inconclusive": 2, "marginal": 1, "pass": 0}
EXIT_CODES: dict[VerdictName, int] = {"pass": 0, "marginal": 1, "fail": 1, "inconclusive": 3}
Source = Literal["burst", "window"]


class GateError(ValueError):
    """The request cannot be answered as asked (unknown flow, no source, …): the caller's to fix."""


class SourceUnavailable(RuntimeError):
    """The samples could not be gathered (the store did not answer): nothing was judged."""


def _names(value: Any) -> Any:
    # Query strings and Flagger metadata carry lists as "a,b"; the CLI repeats the option.
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        return tuple(p.strip() for item in value for p in str(item).split(",") if p.strip())
    return value


Names = Annotated[tuple[str, ...], BeforeValidator(_names)]


class GateRequest(BaseModel):
    """What to compare and how; the field names are the query parameters and Flagger metadata
    keys (the CLI spells them as options: --flow, --min-samples, …)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flow: Names = Field(
        default=(),
        description="Flows to judge (repeat, or comma-separated); default every flow that has "
        "both variants.",
    )
    canary: str = Field(
        default="canary", min_length=1, description="Canary variant; default canary."
    )
    baseline: str = Field(
        default="stable", min_length=1, description="Baseline variant; default stable."
    )
    window: Duration | None = Field(
        default=None, description="Judge the store's runs of this last stretch of time, e.g. 10m."
    )
    burst: int | None = Field(
        default=None,
        ge=1,
        le=MAX_BURST,
        description="Run each flow this many times per variant now (after one warm-up run each).",
    )
    concurrency: int = Field(
        default=8, ge=1, le=MAX_CONCURRENCY, description="Burst runs in flight at once; default 8."
    )
    min_samples: int | None = Field(
        default=None,
        ge=1,
        description="Samples needed per variant for every metric (latency and error ratio); "
        "default the judge's (10 latencies, 20 error observations).",
    )
    allow_marginal: bool = Field(
        default=False, description="Let a marginal verdict pass (with a warning); default false."
    )
    critical: Names = Field(
        default=tuple(sorted(DEFAULT_CRITICAL)),
        description="Metrics whose failure fails the gate outright; default flow.error_ratio.",
    )
    location: str | None = Field(
        default=None, description="Window only: runs from this location; default all."
    )
    until: float | None = Field(
        default=None, description="Window only: its end, unix seconds; default now."
    )
    judge: JudgeConfig = Field(
        default_factory=JudgeConfig, description="The judge's thresholds; default its defaults."
    )

    @model_validator(mode="after")
    def _one_source(self) -> GateRequest:
        if (self.window is None) == (self.burst is None):
            raise ValueError("give exactly one of window (e.g. 10m) or burst (runs per variant)")
        if self.window is not None and self.window <= 0:
            raise ValueError("window must be longer than 0")
        if self.canary == self.baseline:
            raise ValueError(f"canary and baseline are both {self.canary!r}")
        return self

    @property
    def source(self) -> Source:
        return "burst" if self.burst is not None else "window"

    def judge_config(self) -> JudgeConfig:
        if self.min_samples is None:
            return self.judge
        data = self.judge.model_dump()
        data.update(min_samples=self.min_samples, min_error_samples=self.min_samples)
        return JudgeConfig.model_validate(data)


@dataclass(frozen=True, slots=True)
class FlowGate:
    """One flow's verdict and how many runs of each variant it rests on."""

    flow: str
    verdict: Verdict
    canary_runs: int
    baseline_runs: int

    def to_dict(self) -> dict[str, Any]:
        v = self.verdict.to_dict()
        return {
            "flow": self.flow,
            "verdict": v["verdict"],
            "score": v["score"],
            "reasons": v["reasons"],
            "samples": {"canary": self.canary_runs, "baseline": self.baseline_runs},
            "groups": v["groups"],
        }


@dataclass(frozen=True, slots=True)
class GateResult:
    """The gate's answer, the same for the CLI, Argo Rollouts and Flagger."""

    request: GateRequest
    verdict: VerdictName
    score: float | None
    reasons: list[str]
    flows: list[FlowGate]
    since: float | None  # window only
    until: float | None
    elapsed_s: float

    @property
    def passed(self) -> bool:
        """Whether the canary may take more traffic."""
        return self.verdict == "pass" or (
            self.verdict == "marginal" and self.request.allow_marginal
        )

    @property
    def exit_code(self) -> int:
        """0 pass (or allowed marginal), 1 fail or marginal, 3 inconclusive."""
        return 0 if self.passed else EXIT_CODES[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        config = self.request.judge_config()
        return {
            "verdict": self.verdict,
            "passed": self.passed,
            "score": self.score,
            "reasons": list(self.reasons),
            "source": self.request.source,
            "canary": self.request.canary,
            "baseline": self.request.baseline,
            "window_s": self.request.window,
            "burst": self.request.burst,
            "since": self.since,
            "until": self.until,
            "samples": {
                "canary": sum(f.canary_runs for f in self.flows),
                "baseline": sum(f.baseline_runs for f in self.flows),
            },
            "flows": [f.to_dict() for f in self.flows],
            "metrics": [m.to_dict() for f in self.flows for m in f.verdict.metrics],
            "thresholds": {"pass": config.pass_threshold, "marginal": config.marginal_threshold},
            "config": config.model_dump(mode="json"),
            "elapsed_s": round(self.elapsed_s, 3),
        }


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


class _RunPageLike(Protocol):
    @property
    def runs(self) -> Sequence[RunSummaryLike]: ...

    @property
    def next_cursor(self) -> str | None: ...


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


def _resolve_flows(request: GateRequest, engine: Engine | None) -> list[str]:
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


async def _burst(request: GateRequest, engine: Engine | None, names: Sequence[str]) -> Observed:
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
    engine: Engine | None,
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


def _config_metrics(engine: Engine, names: Sequence[str]) -> set[str]:
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
    engine: Engine | None,
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
