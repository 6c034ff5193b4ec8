"""Geometry for the status page's inline SVG: latency sparklines and run waterfalls."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from monitor.store import LinkPoint, RunDetail
from monitor.store.views import StepView
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


SLOW_FACTOR = 3.0  # a passed hop this many times slower than its usual is marked slow
SLOW_MIN_S = 0.1  # ... and at least this much slower (a 2 ms hop at 6 ms is not news)
SLOW_OF_TIMEOUT = 0.5  # without history: slow when it took half the flow's time limit


def slow_note(
    latency_s: float | None, history: Sequence[LinkPoint], timeout_s: float
) -> str | None:
    """Why a passed hop should not read plain green: much slower than its usual (the median
    of its earlier passed latencies), or a large part of the flow's time limit; else None."""
    if latency_s is None:
        return None
    earlier = sorted(
        p.latency_s for p in history[:-1] if p.status == "passed" and p.latency_s is not None
    )
    if earlier:
        usual = earlier[len(earlier) // 2]
        if latency_s >= SLOW_FACTOR * usual and latency_s - usual >= SLOW_MIN_S:
            return f"slow: {latency_s / usual:.1f} times its usual {format_seconds(usual)}"
    if latency_s >= SLOW_OF_TIMEOUT * timeout_s:
        return f"slow: {latency_s / timeout_s:.0%} of the flow's {format_seconds(timeout_s)} limit"
    return None


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
class WaitBar:
    """Part of a waiting hop's bar: the wait for its arrival, or the duplicate window after."""

    name: str  # "wait" or "duplicate_window"
    x: float
    width: float
    seconds: float
    label: str


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
    waits: list[WaitBar] = field(default_factory=list)
    duration_s: float | None = None
    note: str | None = None  # what it waited for, written after the bar


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


def _length(step: StepView) -> float:
    """How long the step ran (a wait at its real length, even one that failed), else its
    latency for runs stored before steps had a duration."""
    if step.duration_s is not None:
        return max(step.duration_s, 0.0)
    return step.latency_s or 0.0


def _waits(
    step: StepView, length: float, x0: float, scale: float
) -> tuple[list[WaitBar], str | None]:
    """A waiting hop's bar in parts: the wait until its arrival came (or the whole step when
    none came), then the duplicate window it watched after; and the note saying so."""
    what = step.attributes.get("wait.for")
    if not isinstance(what, str):
        return [], None
    arrived = step.attributes.get("wait.arrived_s")
    window = step.attributes.get("wait.duplicate_window_s")
    waited = min(float(arrived), length) if isinstance(arrived, int | float) else length
    bars = [WaitBar("wait", round(x0, 2), round(waited * scale, 2), waited, f"waited for {what}")]
    note = f"waited {format_seconds(waited)} for {what}"
    if isinstance(window, int | float) and window > 0 and isinstance(arrived, int | float):
        rest = max(length - waited, 0.0)
        x = x0 + waited * scale
        label = f"duplicate_window {format_seconds(float(window))}: watching for a second one"
        bars.append(WaitBar("duplicate_window", round(x, 2), round(rest * scale, 2), rest, label))
        note += f", then {format_seconds(rest)} of duplicate_window"
    return bars, note


def waterfall(run: RunDetail, width: int = 900, label_width: int = 190) -> Waterfall:
    """Hops on a time axis from the run's start, HTTP phases drawn inside each hop's bar."""
    row_height, top = 26, 22
    right = 130  # room for the latency and reason written after the last bar
    ends = [s.offset_s + _length(s) for s in run.steps]
    total = max([run.duration_s, *ends, 1e-6])
    scale = (width - label_width - right) / total
    hops = []
    for i, step in enumerate(run.steps):
        x = label_width + step.offset_s * scale
        length = _length(step)
        bar_width = max(length * scale, 2.0)
        waits, note = _waits(step, length, x, scale)
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
                waits=waits,
                duration_s=step.duration_s,
                note=note,
            )
        )
    tick = nice_step(total)
    ticks = [
        (round(label_width + k * tick * scale, 2), format_seconds(k * tick))
        for k in range(int(total / tick) + 1)
    ]
    height = top + len(hops) * row_height + 8
    # room for the notes written after the bars (what a wait was for), at ~6 px a character
    notes = [len(h.note) + 24 for h in hops if h.note]
    width += min(max(notes, default=0) * 6, 900)
    return Waterfall(width, height, label_width, row_height, total, hops, ticks)
