"""Turns a RunResult into the rows the store writes, bounded against what a target sends us."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

from monitor.results import RunResult, StepResult
from monitor.store.incidents import Incident

EXCERPT_LIMIT = 2048  # bytes of a failing response kept per hop
MESSAGE_LIMIT = 1024  # bytes of a failure message kept per hop
ATTRIBUTES_LIMIT = 4096  # bytes of a hop's attributes, as JSON
# Failure evidence: a run keeps at most this many artifacts of at most this size, and the store
# the newest ARTIFACTS_KEPT of all (about 50 MiB at most).
ARTIFACT_LIMIT = 256 * 1024
ARTIFACTS_PER_RUN = 4
ARTIFACTS_KEPT = 200
_ELLIPSIS = "…"


def clip_utf8(text: str | None, limit: int) -> str | None:
    """`text` cut to at most `limit` UTF-8 bytes, marked with an ellipsis when cut."""
    if text is None:
        return None
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    room = max(limit - len(_ELLIPSIS.encode()), 0)
    return raw[:room].decode("utf-8", "ignore") + _ELLIPSIS


def _clip_id(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[:limit]


def _clip_opt(value: str | None, limit: int) -> str | None:
    return None if value is None else _clip_id(value, limit)


def _finite(value: float | None) -> float | None:
    # NaN and infinities are not JSON and would make API responses invalid.
    return value if value is None or math.isfinite(value) else None


_json = json.JSONEncoder().encode  # what SQLAlchemy's JSON type wrote: json.dumps's defaults
_attributes_json = json.JSONEncoder(default=str, allow_nan=False, sort_keys=True).encode


def _phases(phases: dict[str, float]) -> str:
    """The phases as `_json` writes them, finite values only. Timers give floats under a few
    plain names: written here from each name's cached JSON and `repr` (what `json` writes for a
    float), 2.5 → 1 µs a hop; anything else is left to `json`."""
    parts = []
    for name, value in phases.items():
        if type(value) is not float or type(name) is not str:
            return _json({str(k): float(v) for k, v in phases.items() if math.isfinite(v)})
        if value - value == 0.0:  # finite: NaN and the infinities give NaN
            parts.append(f"{_json_key(name)}: {value!r}")
    return "{" + ", ".join(parts) + "}"


_json_key = functools.lru_cache(maxsize=256)(_json)  # phase names: a few, over and over


def _attributes(attributes: dict[str, Any]) -> str:
    # Attributes are free-form: keep only what JSON can hold, and not too much of it.
    text = _attributes_json(attributes)
    if len(text) > ATTRIBUTES_LIMIT:  # ASCII: json.dumps escapes the rest
        return _json({"truncated": clip_utf8(text, ATTRIBUTES_LIMIT)})
    return text


# The columns each row tuple holds, in order (the store's INSERTs name them so). JSON columns
# hold their text, as SQLAlchemy's JSON type would have written it: the rows go to the driver
# as plain tuples, without SQLAlchemy's per-row parameter processing (the store's hot path).
RUN_COLUMNS = (
    "id", "flow", "variant", "location", "correlation", "started_at", "finished_at",
    "duration_s", "outcome", "broken_step", "reason", "trace_id", "replica", "maintenance",
)  # fmt: skip
STEP_COLUMNS = (
    "run_id", "position", "name", "kind", "status", "started_at", "offset_s", "latency_s",
    "own_latency_s", "duration_s", "reason", "message", "phases", "attributes", "excerpt",
    "cleanup",
)  # fmt: skip
JSON_COLUMNS = frozenset({"phases", "attributes"})
ARTIFACT_COLUMNS = ("run_id", "position", "name", "media_type", "data")

Row = tuple[Any, ...]


def _step_row(run_id: str, position: int, step: StepResult, excerpt_limit: int) -> Row:
    try:
        attributes = _attributes(step.attributes) if step.attributes else "{}"
    except (TypeError, ValueError):
        attributes = '{"unserialisable": true}'
    return (
        run_id,
        position,
        _clip_id(step.name, 200),
        _clip_id(step.kind, 64),
        step.status,
        step.started_at,
        _finite(step.offset_s) or 0.0,
        _finite(step.latency_s),
        _finite(step.own_latency_s),
        _finite(step.duration_s),
        _clip_opt(step.reason, 64),
        clip_utf8(step.message, MESSAGE_LIMIT),
        _phases(step.phases) if step.phases else "{}",
        attributes,
        clip_utf8(step.excerpt, excerpt_limit),
        step.cleanup,
    )


def run_rows(result: RunResult, excerpt_limit: int = EXCERPT_LIMIT) -> tuple[Row, list[Row]]:
    """The `runs` row and the `step_results` rows of one result (RUN_COLUMNS, STEP_COLUMNS)."""
    broken = result.broken
    run_id = _clip_id(result.run_id, 64)
    run = (
        run_id,
        _clip_id(result.flow, 200),
        _clip_id(result.variant, 200),
        _clip_id(result.location, 200),
        _clip_id(result.correlation, 200),
        result.started_at,
        result.started_at + result.duration_s,
        result.duration_s,
        result.outcome,
        _clip_id(broken.name, 200) if broken else None,
        _clip_opt(broken.reason, 64) if broken else None,
        _clip_opt(result.trace_id, 64),
        _clip_opt(result.replica, 200),
        result.maintenance,
    )
    steps = [_step_row(run_id, i, s, excerpt_limit) for i, s in enumerate(result.steps)]
    return run, steps


def row_dict(columns: tuple[str, ...], row: Row) -> dict[str, Any]:
    """A row tuple as the mapping SQLAlchemy Core takes (JSON columns decoded)."""
    out = dict(zip(columns, row, strict=True))
    for name in JSON_COLUMNS & out.keys():
        out[name] = json.loads(out[name])
    return out


def artifact_rows(result: RunResult) -> list[Row]:
    """The `step_artifacts` rows of one result (ARTIFACT_COLUMNS): its hops' evidence, within
    the limits."""
    rows: list[Row] = []
    run_id = _clip_id(result.run_id, 64)
    for position, step in enumerate(result.steps):
        for artifact in step.artifacts:
            if len(rows) >= ARTIFACTS_PER_RUN:
                return rows
            if len(artifact.data) > ARTIFACT_LIMIT:
                continue
            name, media_type = _clip_id(artifact.name, 64), _clip_id(artifact.media_type, 100)
            rows.append((run_id, position, name, media_type, artifact.data))
    return rows


def incident_row(incident: Incident) -> dict[str, Any]:
    """The `incidents` row of an incident, clipped like the runs it came from."""
    row = incident.to_row()
    for name in ("flow", "variant", "location", "step"):
        row[name] = _clip_id(row[name], 200)
    for name in ("first_run_id", "last_failed_run_id"):
        row[name] = _clip_id(row[name], 64)
    row["closing_run_id"] = _clip_opt(row["closing_run_id"], 64)
    row["reason"] = _clip_opt(row["reason"], 64)
    row["last_reason"] = _clip_opt(row["last_reason"], 64)
    row["close_reason"] = _clip_opt(row["close_reason"], 200)
    return row
