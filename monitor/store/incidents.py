"""Incident decisions per link, kept in memory so that each run costs a dict lookup, not a query.

A link is (flow, variant, location, step). Its first failing run opens an incident; the first
later run where the link passed closes it. A link that fails again within its rules'
`flap_window` of closing, with the same reason (or any, as `reopen` says), reopens the same
incident (counting a flap) instead of opening a new one, so a flapping link shows as one
incident with many failures rather than as a storm of incidents; faults further apart, or of
another kind, are separate incidents. A hop skipped after an earlier hop broke neither opens
nor keeps an incident: it closes one that was open (with that reason), since nothing is known
of the link while it is not run. Incidents of links no longer configured are closed at start.
A run in a maintenance window neither opens, reopens nor extends an incident (the failure was
planned); its passing hops still close one, since they show the link works.
Observers (the events sink) are told of each opening, closing and reopening as it is decided.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from monitor.results import RunResult, StepResult

if TYPE_CHECKING:
    from monitor.config import Config

LinkKey = tuple[str, str, str, str]  # flow, variant, location, step
Transition = Literal["opened", "closed", "reopened"]
Observer = Callable[[Transition, "Incident"], None]

log = logging.getLogger(__name__)

NOT_CONFIGURED: Final = "link no longer configured"


@dataclass(frozen=True, slots=True)
class IncidentRules:
    """When a failure reopens a recently closed incident instead of opening a new one."""

    flap_window: float = 60.0  # seconds after closing; 0: never reopen
    reopen: Literal["same_reason", "any_reason"] = "same_reason"


@dataclass(frozen=True, slots=True)
class IncidentPolicy:
    """The rules of every flow, and which links are configured (None: not known, keep all)."""

    default: IncidentRules = IncidentRules()
    flows: Mapping[str, IncidentRules] = field(default_factory=dict)
    configured: Collection[tuple[str, str, str]] | None = None  # (flow, variant, step)

    def rules(self, flow: str) -> IncidentRules:
        return self.flows.get(flow, self.default)

    @property
    def longest_window(self) -> float:
        return max([self.default.flap_window, *(r.flap_window for r in self.flows.values())])


def policy_of(config: Config) -> IncidentPolicy:
    """The incident rules of `settings.incidents` and each flow's `incidents`, and the links the
    configuration has."""

    def rules(section: Any) -> IncidentRules:
        return IncidentRules(float(section.flap_window), section.reopen)

    return IncidentPolicy(
        default=rules(config.settings.incidents),
        flows={f.name: rules(f.incidents) for f in config.flows if f.incidents is not None},
        configured={
            (f.name, variant, step.name)
            for f in config.flows
            for variant in f.variants
            for step in f.steps
        },
    )


@dataclass(slots=True)
class Incident:
    """One stretch of time during which a link was broken (possibly flapping)."""

    id: str
    flow: str
    variant: str
    location: str
    step: str
    opened_at: float
    last_failure_at: float
    first_run_id: str
    last_failed_run_id: str
    failures: int = 1
    flaps: int = 0
    reason: str | None = None
    last_reason: str | None = None
    closed_at: float | None = None
    closing_run_id: str | None = None
    close_reason: str | None = None  # when not closed by a passing run

    @property
    def is_open(self) -> bool:
        return self.closed_at is None

    @property
    def link(self) -> LinkKey:
        return (self.flow, self.variant, self.location, self.step)

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Incident:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


def _new_id() -> str:
    return str(uuid.uuid4())


class IncidentBook:
    """The latest incident of every link, and which incidents changed since the last write."""

    def __init__(
        self,
        flap_window: float | None = None,
        new_id: Callable[[], str] = _new_id,
        *,
        policy: IncidentPolicy | None = None,
    ) -> None:
        if policy is None:
            policy = IncidentPolicy(IncidentRules(60.0 if flap_window is None else flap_window))
        self.policy = policy
        self._new_id = new_id
        self.latest: dict[LinkKey, Incident] = {}
        self._dirty: dict[str, Incident] = {}
        self._observers: list[Observer] = []

    def observe(self, observer: Observer) -> None:
        """Call `observer` at each decided transition (not for incidents loaded or forgotten);
        it must be quick, and copy the incident if it keeps it (the book changes it later)."""
        self._observers.append(observer)

    @property
    def flap_window(self) -> float:
        """The longest window of any flow: closed incidents younger than this may reopen."""
        return self.policy.longest_window

    def load(self, incidents: Iterable[Incident], now: float | None = None) -> None:
        """Adopt stored incidents (open, or closed recently enough to be reopened); close those
        of links the configuration no longer has (at `now`), saying so."""
        configured = self.policy.configured
        for incident in sorted(incidents, key=lambda i: i.opened_at):
            if (
                configured is not None
                and incident.is_open
                and (incident.flow, incident.variant, incident.step) not in configured
            ):
                incident.closed_at = incident.last_failure_at if now is None else now
                incident.close_reason = NOT_CONFIGURED
                self._dirty[incident.id] = incident
            self.latest[incident.link] = incident

    def replace(self, flows: Collection[str], incidents: Iterable[Incident]) -> None:
        """Adopt the stored incidents of `flows` in place of whatever the book had for them."""
        self.forget(flows)
        self.load(i for i in incidents if i.flow in flows)

    def forget(self, flows: Collection[str]) -> None:
        """Drop every link of `flows` (another replica decides them now); unwritten changes
        stay queued for the writer."""
        for key in [key for key in self.latest if key[0] in flows]:
            del self.latest[key]

    def apply(self, run: RunResult) -> None:
        """Open, extend, reopen or close incidents according to one run's hops."""
        for step in run.hops:
            key = (run.flow, run.variant, run.location, step.name)
            if step.status == "failed":
                if not run.maintenance:
                    self._failed(key, run, step)
            elif step.status == "passed":
                self._passed(key, run)
            elif step.status == "skipped":
                self._skipped(key, run, step)
            # aborted hops tell nothing about the link

    def open_incidents(self) -> list[Incident]:
        return sorted((i for i in self.latest.values() if i.is_open), key=lambda i: i.opened_at)

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def take_dirty(self) -> list[Incident]:
        """Incidents to write; hand them back with `mark_dirty` if the write fails."""
        dirty = list(self._dirty.values())
        self._dirty.clear()
        return dirty

    def mark_dirty(self, incidents: Iterable[Incident]) -> None:
        for incident in incidents:
            self._dirty.setdefault(incident.id, incident)

    def _notify(self, transition: Transition, incident: Incident) -> None:
        for observer in self._observers:
            try:
                observer(transition, incident)
            except Exception:  # an observer's bug must not undo a decision
                log.exception("incident observer failed on %s %s", transition, incident.id)

    def _failed(self, key: LinkKey, run: RunResult, step: StepResult) -> None:
        incident = self.latest.get(key)
        at = run.started_at
        transition: Transition | None = None
        if incident is not None and incident.closed_at is not None:
            rules = self.policy.rules(run.flow)
            if (
                at - incident.closed_at <= rules.flap_window
                and (rules.reopen == "any_reason" or step.reason == incident.last_reason)
                and incident.close_reason != NOT_CONFIGURED
            ):
                incident.closed_at = None
                incident.closing_run_id = None
                incident.close_reason = None
                incident.flaps += 1
                transition = "reopened"
            else:
                incident = None
        if incident is None:
            transition = "opened"
            incident = Incident(
                id=self._new_id(),
                flow=run.flow,
                variant=run.variant,
                location=run.location,
                step=step.name,
                opened_at=at,
                last_failure_at=at,
                first_run_id=run.run_id,
                last_failed_run_id=run.run_id,
                failures=0,
                reason=step.reason,
            )
            self.latest[key] = incident
        incident.failures += 1
        incident.last_failure_at = max(incident.last_failure_at, at)
        incident.last_failed_run_id = run.run_id
        incident.last_reason = step.reason
        self._dirty[incident.id] = incident
        if transition is not None:
            self._notify(transition, incident)

    def _passed(self, key: LinkKey, run: RunResult) -> None:
        incident = self.latest.get(key)
        # A pass that started before the latest failure arrived late: it proves no recovery.
        if incident is None or not incident.is_open or run.started_at < incident.last_failure_at:
            return
        incident.closed_at = run.started_at
        incident.closing_run_id = run.run_id
        self._dirty[incident.id] = incident
        self._notify("closed", incident)

    def _skipped(self, key: LinkKey, run: RunResult, step: StepResult) -> None:
        """Skipped after an earlier hop broke: the link is not known broken any more, and the
        incident of the hop that broke says what is; close this one, saying why."""
        incident = self.latest.get(key)
        if incident is None or not incident.is_open or run.started_at < incident.last_failure_at:
            return
        broken = run.broken
        incident.closed_at = run.started_at
        incident.closing_run_id = run.run_id
        incident.close_reason = (
            f"skipped: {broken.name} broke ({broken.reason})" if broken else "skipped"
        )
        self._dirty[incident.id] = incident
        self._notify("closed", incident)
