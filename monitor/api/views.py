"""What the API answers, kept apart from HTTP: response bodies and the views built from runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from monitor.results import RunResult
from monitor.store import RunDetail, RunSummary, Store

# --- what the API needs of a flow (monitor.config.Flow satisfies this) ---------------------


class StepLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...


class FlowLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def interval(self) -> float: ...

    @property
    def timeout(self) -> float: ...

    @property
    def location(self) -> str | None: ...

    @property
    def variants(self) -> Mapping[str, Any]: ...

    @property
    def steps(self) -> Sequence[StepLike]: ...

    @property
    def cleanup(self) -> Sequence[StepLike]: ...


# The flows as configured: a fixed list, or a callable asked at each request, so that the API
# and the status page follow a live reload of the flow files.
FlowSource = Sequence[FlowLike] | Callable[[], Sequence[FlowLike]]


def current_flows(source: FlowSource) -> Sequence[FlowLike]:
    """The flows `source` holds now."""
    return source() if callable(source) else source


# --- response bodies -----------------------------------------------------------------------

LinkStatus = Literal["passed", "failed", "skipped", "aborted", "unknown"]


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StepInfo(_Body):
    name: str
    kind: str


class LinkState(_Body):
    """One hop's state in the latest run of a flow variant."""

    step: str
    kind: str
    status: LinkStatus = Field(description="The hop's status in the last run; unknown if none.")
    latency_s: float | None
    reason: str | None
    message: str | None


class VariantState(_Body):
    """The latest run of one variant of a flow, hop by hop."""

    variant: str
    outcome: Literal["success", "failure", "aborted", "unknown"]
    last_run: RunSummary | None
    links: list[LinkState]


class FlowView(_Body):
    name: str
    interval_s: float
    timeout_s: float
    location: str | None
    steps: list[StepInfo]
    cleanup: list[StepInfo]
    variants: list[VariantState]


class FlowList(_Body):
    flows: list[FlowView]


class ErrorBody(_Body):
    error: str


class HealthBody(_Body):
    """What /healthz and /readyz (monitor/admin.py) answer."""

    status: Literal["ok", "ready", "starting"]


class ClusterMember(_Body):
    replica: str = Field(description="The replica's name (--replica).")
    flow_set_digest: str | None = Field(description="Digest of the flows it loaded.")
    partitions: list[int] = Field(description="Control-topic partitions it owns.")
    flows: list[str] = Field(description="The flows it schedules.")


class ClusterView(_Body):
    """Who runs which flows: the group as of the last rebalance (one member when alone)."""

    group: str | None = Field(description="The consumer group; null when running alone.")
    topic: str | None = Field(description="The control topic; null when running alone.")
    replica: str = Field(description="The replica that answered.")
    generation: int | None = Field(description="The group's generation, when known.")
    rebalances: int = Field(description="Rebalances this replica took part in.")
    last_rebalance_unix: float | None = Field(description="When the last one ended.")
    partitions: int | None = Field(description="Partitions of the control topic.")
    flow_set_digest: str | None = Field(description="Digest of this replica's flows.")
    members: list[ClusterMember] = Field(description="Every member with its flows.")


def standalone_view(replica: str, flows: Sequence[FlowLike]) -> ClusterView:
    """What a replica running alone answers: one member with every flow, no group."""
    names = sorted(f.name for f in flows)
    member = ClusterMember(replica=replica, flow_set_digest=None, partitions=[], flows=names)
    return ClusterView(
        group=None, topic=None, replica=replica, generation=None, rebalances=0,
        last_rebalance_unix=None, partitions=None, flow_set_digest=None, members=[member],
    )  # fmt: skip


# --- views ---------------------------------------------------------------------------------


def summary_of(result: RunResult) -> RunSummary:
    """The API's summary of an in-memory run result."""
    broken = result.broken
    return RunSummary(
        run_id=result.run_id,
        flow=result.flow,
        variant=result.variant,
        location=result.location,
        correlation=result.correlation,
        started_at=result.started_at,
        duration_s=result.duration_s,
        outcome=result.outcome,
        broken_step=broken.name if broken else None,
        reason=broken.reason if broken else None,
        trace_id=result.trace_id,
        replica=result.replica,
        maintenance=result.maintenance,
    )


def _last_summary(last: RunResult | RunDetail | None) -> RunSummary | None:
    if last is None:
        return None
    if isinstance(last, RunResult):
        return summary_of(last)
    return RunSummary(**last.model_dump(include=set(RunSummary.model_fields)))


def _links(flow: FlowLike, last: RunResult | RunDetail | None) -> list[LinkState]:
    seen = {s.name: s for s in last.steps if not s.cleanup} if last is not None else {}
    links = []
    for step in flow.steps:
        hop = seen.get(step.name)
        links.append(
            LinkState(
                step=step.name,
                kind=step.kind,
                status=hop.status if hop else "unknown",
                latency_s=hop.latency_s if hop else None,
                reason=hop.reason if hop else None,
                message=hop.message if hop else None,
            )
        )
    return links


def flow_view(flow: FlowLike, last_runs: Mapping[str, RunResult | RunDetail | None]) -> FlowView:
    """A flow with the state of each link in the latest run of each variant."""
    variants = []
    for name in flow.variants or {"default": None}:
        last = last_runs.get(name)
        variants.append(
            VariantState(
                variant=name,
                outcome=last.outcome if last is not None else "unknown",
                last_run=_last_summary(last),
                links=_links(flow, last),
            )
        )
    return FlowView(
        name=flow.name,
        interval_s=float(flow.interval),
        timeout_s=float(flow.timeout),
        location=flow.location,
        steps=[StepInfo(name=s.name, kind=s.kind) for s in flow.steps],
        cleanup=[StepInfo(name=s.name, kind=s.kind) for s in flow.cleanup],
        variants=variants,
    )


async def flow_views(
    flows: Sequence[FlowLike],
    last_runs: Mapping[tuple[str, str], RunResult],
    store: Store | None,
) -> list[FlowView]:
    """Every flow's link states: from the runner's last results, else the store's latest run."""
    views = []
    for flow in flows:
        latest: dict[str, RunResult | RunDetail | None] = {}
        for variant in flow.variants or {"default": None}:
            last: RunResult | RunDetail | None = last_runs.get((flow.name, variant))
            if last is None and store is not None:
                last = await _stored_latest(store, flow.name, variant)
            latest[variant] = last
        views.append(flow_view(flow, latest))
    return views


async def _stored_latest(store: Store, flow: str, variant: str) -> RunDetail | None:
    try:
        return await store.latest_run(flow, variant)
    except Exception:  # the store being away must not hide the flows
        return None
