"""Maintenance windows: declared ones (flow files, fixed or on a cron schedule) and concrete ones.

A window covers the runs of some flows and/or variants between `start` and `end`: they go on,
are stored and exported marked `maintenance`, and open no incident. A declared window with a
`schedule` (a cron expression, read in UTC by croniter) stands for one concrete window per
occurrence, each `duration` long.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from croniter import croniter
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from probes.durations import Duration

Source = Literal["api", "config"]
# How many occurrences of one schedule are listed ahead (the page and the API show upcoming ones)
UPCOMING_PER_SCHEDULE = 3
MAX_REASON = 500
# A time as flow files and the API take it (validators turn it into unix seconds)
TimeValue = Annotated[
    float,
    WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "string", "format": "date-time"}]}),
]


@dataclass(frozen=True, slots=True)
class Window:
    """One concrete window: which flows and variants, from `start` to `end` (unix seconds)."""

    id: str
    flows: tuple[str, ...]
    variants: tuple[str, ...]
    start: float
    end: float
    reason: str
    source: Source = "api"
    created_at: float | None = None

    def applies(self, flow: str, variant: str) -> bool:
        """Empty `flows` means every flow (of `variants`), and the other way round."""
        return (not self.flows or flow in self.flows) and (
            not self.variants or variant in self.variants
        )

    def overlaps(self, t0: float, t1: float) -> bool:
        """Whether any moment of [t0, t1] lies in [start, end)."""
        return self.start < self.end and self.start <= t1 and t0 < self.end

    def status(self, now: float) -> Literal["upcoming", "active", "ended"]:
        if now < self.start:
            return "upcoming"
        return "active" if now < self.end else "ended"


def parse_time(value: Any, what: str = "time") -> float:
    """Unix seconds from a number of them or an RFC 3339 text with its offset (`Z` or +hh:mm);
    errors start with `what: ` (nothing when empty: the caller says where)."""
    if isinstance(value, bool):
        raise ValueError(_said(what, f"want RFC 3339 or unix seconds, got {value!r}"))
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(_said(what, "give a time zone, e.g. 2026-12-06T02:00:00Z"))
        seconds = value.timestamp()
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", text):
            seconds = float(text)
        else:
            try:
                parsed = datetime.fromisoformat(text.replace("z", "Z"))
            except ValueError:
                raise ValueError(
                    f"{what}: {value!r} is neither RFC 3339 (2026-12-06T02:00:00Z) nor unix seconds"
                ) from None
            return parse_time(parsed, what)
    else:
        raise ValueError(_said(what, f"want RFC 3339 or unix seconds, got {value!r}"))
    if not math.isfinite(seconds):
        raise ValueError(_said(what, f"{value!r} is not a finite time"))
    return seconds


def _said(what: str, message: str) -> str:
    return f"{what}: {message}" if what else message


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z")


class MaintenanceSpec(BaseModel):
    """A window declared in a flow file (`maintenance:`): fixed times or a cron schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flows: list[str] = Field(
        default_factory=list, description="Flows it covers; default every flow (of `variants`)."
    )
    variants: list[str] = Field(
        default_factory=list, description="Variants it covers; default every variant (of `flows`)."
    )
    start: TimeValue | None = Field(
        default=None, description="Start: RFC 3339 with an offset, or unix seconds; default none."
    )
    end: TimeValue | None = Field(default=None, description="End, as `start`; default none.")
    schedule: str | None = Field(
        default=None,
        description="Cron expression (5 fields, UTC) of each window's start, instead of "
        "start/end; default none.",
    )
    duration: Duration | None = Field(
        default=None, description="Length of each scheduled window (with `schedule`); default none."
    )
    reason: str = Field(min_length=1, max_length=MAX_REASON, description="Why; required.")

    @field_validator("start", "end", mode="before")
    @classmethod
    def _time(cls, value: Any) -> float | None:
        return None if value is None else parse_time(value, "")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"not a cron expression: {value!r} (e.g. '0 2 * * 6')")
        return value

    @model_validator(mode="after")
    def _one_shape(self) -> MaintenanceSpec:
        if not self.flows and not self.variants:
            raise ValueError("name the flows and/or variants the window covers")
        fixed = self.start is not None or self.end is not None
        scheduled = self.schedule is not None or self.duration is not None
        if fixed == scheduled:
            raise ValueError("give either start and end, or schedule and duration")
        if fixed and (self.start is None or self.end is None or self.end <= self.start):
            raise ValueError("give start and end, end after start")
        if scheduled and (self.schedule is None or not self.duration):
            raise ValueError("give schedule and a duration longer than 0")
        return self

    def occurrences(self, index: int, since: float, until: float) -> Iterator[Window]:
        """The concrete windows of this declaration that overlap [since, until]."""
        common: dict[str, Any] = {
            "flows": tuple(self.flows),
            "variants": tuple(self.variants),
            "reason": self.reason,
            "source": "config",
        }
        if self.schedule is None:
            assert self.start is not None and self.end is not None
            window = Window(id=f"config-{index}", start=self.start, end=self.end, **common)
            if window.overlaps(since, until):
                yield window
            return
        assert self.duration is not None
        duration = float(self.duration)
        # croniter's get_next is strictly after its base: step back a hair to include `since`.
        fires = croniter(self.schedule, since - duration - 1e-3)
        for _ in range(10_000):  # bounded: a per-minute schedule over a week is 10,080
            start = fires.get_next(float)
            if start > until:
                return
            window = Window(
                id=f"config-{index}@{int(start)}", start=start, end=start + duration, **common
            )
            if window.overlaps(since, until):
                yield window


class _FlowNames(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def variants(self) -> Mapping[str, Any]: ...


def unknown_names(
    path: Path, windows: Sequence[MaintenanceSpec], flows: Sequence[_FlowNames]
) -> list[str]:
    """`file:line: ...` for each flow or variant a declared window names that no flow has (a
    typo would silently cover nothing); `flows` are those of every file."""
    if not windows:
        return []
    known = {f.name: f for f in flows}
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next((i for i, text in enumerate(lines) if text.startswith("maintenance:")), 0)

    def line_of(name: str) -> int:
        found = (i for i in range(start, len(lines)) if name in lines[i])
        return next(found, start) + 1

    problems: list[str] = []
    for i, window in enumerate(windows):
        for name in window.flows:
            if name not in known:
                problems.append(
                    f"{path}:{line_of(name)}: maintenance.{i}.flows: unknown flow {name!r}"
                )
        covered = [known[n] for n in window.flows if n in known] or list(flows)
        variants = {v for f in covered for v in f.variants}
        for name in window.variants:
            if name not in variants:
                problems.append(
                    f"{path}:{line_of(name)}: maintenance.{i}.variants: no flow it covers has "
                    f"variant {name!r}"
                )
    return problems
