"""Geometry for the status page's inline SVG: latency sparklines and run waterfalls."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from monitor.store import LinkPoint, RunDetail
from probes.http_common import PHASES

# HTTP phases in the order they happen, then a browser step's (its setup comes first; the rest
# add up the actions of each sort); unknown phases are drawn after these.
PHASE_ORDER = (*PHASES, "setup", "navigation", "actions", "network")


@dataclass(slots=True)
class Spark:
    """A sparkline: a path through passed latencies, and dots where the link failed."""

    width: int
    height: int
    path: str
    failures: list[tuple[float, float]]
    last: tuple[float, float] | None
    max_latency_s: float


def sparkline(points: Sequence[LinkPoint], width: int = 120, height: int = 24) -> Spark | None:
    """Latency over the last runs; failed hops drawn as red dots on the baseline."""
    if not points:
        return None
    latencies = [p.latency_s for p in points if p.status == "passed" and p.latency_s is not None]
    top = max(latencies, default=0.0) or 1.0
    step = (width - 4) / max(len(points) - 1, 1)
    pad = 2.0
    coords: list[tuple[float, float]] = []
    failures: list[tuple[float, float]] = []
    for i, point in enumerate(points):
        x = round(pad + i * step, 1)
        if point.status == "failed":
            failures.append((x, height - pad))
        elif point.status == "passed" and point.latency_s is not None:
            y = round(height - pad - (point.latency_s / top) * (height - 2 * pad), 1)
            coords.append((x, y))
    path = " ".join(f"{'M' if i == 0 else 'L'}{x},{y}" for i, (x, y) in enumerate(coords))
    return Spark(width, height, path, failures, coords[-1] if coords else None, top)


def nice_step(span: float, target_ticks: int = 6) -> float:
    """A 1-2-5 tick interval giving about `target_ticks` ticks over `span`."""
    if span <= 0:
        return 1.0
    raw = span / target_ticks
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


@dataclass(slots=True)
class PhaseBar:
    name: str
    x: float
    width: float
    seconds: float


@dataclass(slots=True)
class HopBar:
    """One hop on the waterfall: where it starts, how wide, and its HTTP phases inside."""

    name: str
    kind: str
    status: str
    cleanup: bool
    y: float
    x: float
    width: float
    latency_s: float | None
    reason: str | None
    phases: list[PhaseBar] = field(default_factory=list)


@dataclass(slots=True)
class Waterfall:
    width: int
    height: int
    label_width: int
    row_height: int
    total_s: float
    hops: list[HopBar]
    ticks: list[tuple[float, str]]  # x, label


def _phase_bars(phases: dict[str, float], x0: float, scale: float) -> list[PhaseBar]:
    names = [p for p in PHASE_ORDER if p in phases] + sorted(set(phases) - set(PHASE_ORDER))
    bars, x = [], x0
    for name in names:
        seconds = max(phases[name], 0.0)
        width = seconds * scale
        bars.append(PhaseBar(name, round(x, 2), round(width, 2), seconds))
        x += width
    return bars


def format_seconds(seconds: float | None) -> str:
    """A latency for people: `850 µs`, `12.3 ms`, `1.24 s`."""
    if seconds is None:
        return "\u2013"  # an en dash: "no value"
    if seconds == 0:
        return "0"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    return f"{seconds:.3g} s"


def waterfall(run: RunDetail, width: int = 900, label_width: int = 190) -> Waterfall:
    """Hops on a time axis from the run's start, HTTP phases drawn inside each hop's bar."""
    row_height, top = 26, 22
    right = 130  # room for the latency and reason written after the last bar
    ends = [s.offset_s + (s.latency_s or 0.0) for s in run.steps]
    total = max([run.duration_s, *ends, 1e-6])
    scale = (width - label_width - right) / total
    hops = []
    for i, step in enumerate(run.steps):
        x = label_width + step.offset_s * scale
        bar_width = max((step.latency_s or 0.0) * scale, 2.0)
        hops.append(
            HopBar(
                name=step.name,
                kind=step.kind,
                status=step.status,
                cleanup=step.cleanup,
                y=top + i * row_height,
                x=round(x, 2),
                width=round(bar_width, 2),
                latency_s=step.latency_s,
                reason=step.reason,
                phases=_phase_bars(step.phases, x, scale),
            )
        )
    tick = nice_step(total)
    ticks = [
        (round(label_width + k * tick * scale, 2), format_seconds(k * tick))
        for k in range(int(total / tick) + 1)
    ]
    height = top + len(hops) * row_height + 8
    return Waterfall(width, height, label_width, row_height, total, hops, ticks)
