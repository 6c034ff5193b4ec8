"""Read queries over the store: run and incident pages for the API, samples for the canary gate."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from sqlalchemy import Row, Select, and_, delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from monitor.maintenance.windows import Window
from monitor.store.incidents import Incident
from monitor.store.schema import (
    incidents,
    maintenance_windows,
    runs,
    step_artifacts,
    step_results,
)
from monitor.store.views import (
    ArtifactInfo,
    IncidentPage,
    IncidentView,
    LinkPoint,
    RunDetail,
    RunPage,
    RunSummary,
    StepSamples,
    StepView,
)

if TYPE_CHECKING:
    _AnyRow: TypeAlias = Row[*tuple[Any, ...]]

_RUN_COLUMNS = (
    runs.c.id,
    runs.c.flow,
    runs.c.variant,
    runs.c.location,
    runs.c.correlation,
    runs.c.started_at,
    runs.c.duration_s,
    runs.c.outcome,
    runs.c.broken_step,
    runs.c.reason,
    runs.c.trace_id,
    runs.c.replica,
    runs.c.maintenance,
)


class BadCursor(ValueError):
    """A pagination cursor that is not of the form `<unix seconds>~<id>`."""


# A cursor is a readable position, `<unix seconds>~<id>`: the page starts strictly after it
# (newest first). Any position is valid, so a hand-made cursor works too.
# The pattern means the same in ECMA (the OpenAPI document) and Python (fullmatch, here).
CURSOR_PATTERN = r"^-?[0-9]{1,17}(\.[0-9]{1,17})?([eE][+-]?[0-9]{1,2})?~[^\n\r\u2028\u2029]*$"
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(at: float, key: str) -> str:
    return f"{at!r}~{key}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    if not _CURSOR.fullmatch(cursor):
        raise BadCursor(f"bad cursor {cursor!r}: want <unix seconds>~<id>")
    at, _, key = cursor.partition("~")
    return float(at), key


def _summary(row: _AnyRow) -> RunSummary:
    data = row._asdict()
    data["run_id"] = data.pop("id")
    data["maintenance"] = bool(data["maintenance"])  # null: stored before v0004
    return RunSummary(**data)


def _step(row: _AnyRow) -> StepView:
    return StepView(
        name=row.name,
        kind=row.kind,
        status=row.status,
        started_at=row.started_at,
        offset_s=row.offset_s,
        latency_s=row.latency_s,
        own_latency_s=row.own_latency_s,
        duration_s=row.duration_s,
        reason=row.reason,
        message=row.message,
        phases=row.phases or {},
        attributes=row.attributes or {},
        excerpt=row.excerpt,
        cleanup=row.cleanup,
    )


async def list_runs(
    conn: AsyncConnection,
    *,
    flow: str | None = None,
    variant: str | None = None,
    location: str | None = None,
    outcome: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> RunPage:
    """Runs matching every given filter, newest first, `limit` per page (keyset pagination)."""
    query: Select[Any] = select(*_RUN_COLUMNS)
    for column, value in (
        (runs.c.flow, flow),
        (runs.c.variant, variant),
        (runs.c.location, location),
        (runs.c.outcome, outcome),
    ):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(runs.c.started_at >= since)
    if until is not None:
        query = query.where(runs.c.started_at < until)
    if cursor is not None:
        at, key = decode_cursor(cursor)
        query = query.where(
            or_(runs.c.started_at < at, and_(runs.c.started_at == at, runs.c.id < key))
        )
    query = query.order_by(runs.c.started_at.desc(), runs.c.id.desc()).limit(limit + 1)
    rows = (await conn.execute(query)).all()
    page = [_summary(r) for r in rows[:limit]]
    more = len(rows) > limit
    next_cursor = encode_cursor(page[-1].started_at, page[-1].run_id) if more else None
    return RunPage(runs=page, next_cursor=next_cursor)


async def get_run(conn: AsyncConnection, run_id: str) -> RunDetail | None:
    """One run with its hops, or None."""
    row = (await conn.execute(select(*_RUN_COLUMNS).where(runs.c.id == run_id))).first()
    if row is None:
        return None
    steps = (
        await conn.execute(
            select(step_results)
            .where(step_results.c.run_id == run_id)
            .order_by(step_results.c.position)
        )
    ).all()
    summary = _summary(row)
    return RunDetail(**summary.model_dump(), steps=[_step(s) for s in steps])


async def artifacts(conn: AsyncConnection, run_id: str) -> list[ArtifactInfo]:
    """The evidence a run's hops kept, by hop position, without the bytes."""
    a = step_artifacts.c
    rows = await conn.execute(
        select(a.position, a.name, a.media_type, func.length(a.data).label("size"))
        .where(a.run_id == run_id)
        .order_by(a.position, a.id)
    )
    return [ArtifactInfo(**row._asdict()) for row in rows]


async def keep_newest_artifacts(conn: AsyncConnection, kept: int) -> None:
    """Delete all but the newest `kept` artifacts (ids grow with every insert)."""
    a = step_artifacts.c
    oldest_kept = select(a.id).order_by(a.id.desc()).offset(kept - 1).limit(1).scalar_subquery()
    await conn.execute(delete(step_artifacts).where(a.id < oldest_kept))


async def artifact(
    conn: AsyncConnection, run_id: str, position: int, name: str
) -> tuple[str, bytes] | None:
    a = step_artifacts.c
    row = (
        await conn.execute(
            select(a.media_type, a.data)
            .where(a.run_id == run_id, a.position == position, a.name == name)
            .order_by(a.id.desc())
            .limit(1)
        )
    ).first()
    return None if row is None else (row.media_type, bytes(row.data))


async def latest_run(conn: AsyncConnection, flow: str, variant: str) -> RunDetail | None:
    """The newest stored run of one flow variant, with its hops."""
    run_id = (
        await conn.execute(
            select(runs.c.id)
            .where(runs.c.flow == flow, runs.c.variant == variant)
            .order_by(runs.c.started_at.desc(), runs.c.id.desc())
            .limit(1)
        )
    ).scalar()
    return None if run_id is None else await get_run(conn, run_id)


def _incident_view(row: _AnyRow) -> IncidentView:
    data = row._asdict()
    data["status"] = "open" if data["closed_at"] is None else "closed"
    return IncidentView(**data)


async def list_incidents(
    conn: AsyncConnection,
    *,
    status: str | None = None,
    flow: str | None = None,
    variant: str | None = None,
    location: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> IncidentPage:
    """Incidents, most recently opened first; `status` is open, closed or None for both."""
    query: Select[Any] = select(incidents)
    if status == "open":
        query = query.where(incidents.c.closed_at.is_(None))
    elif status == "closed":
        query = query.where(incidents.c.closed_at.is_not(None))
    if flow is not None:
        query = query.where(incidents.c.flow == flow)
    if variant is not None:
        query = query.where(incidents.c.variant == variant)
    if location is not None:
        query = query.where(incidents.c.location == location)
    if cursor is not None:
        at, key = decode_cursor(cursor)
        query = query.where(
            or_(incidents.c.opened_at < at, and_(incidents.c.opened_at == at, incidents.c.id < key))
        )
    query = query.order_by(incidents.c.opened_at.desc(), incidents.c.id.desc()).limit(limit + 1)
    rows = (await conn.execute(query)).all()
    page = [_incident_view(r) for r in rows[:limit]]
    more = len(rows) > limit
    next_cursor = encode_cursor(page[-1].opened_at, page[-1].id) if more else None
    return IncidentPage(incidents=page, next_cursor=next_cursor)


# Flow names bound per IN (...) list: well under SQLite's and asyncpg's parameter limits.
_IN_CHUNK = 500


async def load_incidents(
    conn: AsyncConnection, closed_since: float, flows: Collection[str] | None = None
) -> list[Incident]:
    """Open incidents and those closed after `closed_since` (still eligible for reopening),
    of every flow or only of `flows`."""
    query = select(incidents).where(
        or_(incidents.c.closed_at.is_(None), incidents.c.closed_at >= closed_since)
    )
    if flows is None:
        rows = (await conn.execute(query)).all()
        return [Incident.from_row(r._asdict()) for r in rows]
    names = sorted(flows)
    found: list[Incident] = []
    for start in range(0, len(names), _IN_CHUNK):
        chunk = names[start : start + _IN_CHUNK]
        rows = (await conn.execute(query.where(incidents.c.flow.in_(chunk)))).all()
        found += [Incident.from_row(r._asdict()) for r in rows]
    return found


async def samples(
    conn: AsyncConnection,
    flow: str,
    variant: str,
    since: float,
    until: float,
    location: str | None = None,
) -> dict[str, StepSamples]:
    """Per-hop samples of one flow variant for runs started in [since, until), in time order;
    runs in a maintenance window are left out (planned trouble says nothing of a canary)."""
    query = (
        select(
            step_results.c.name,
            step_results.c.kind,
            step_results.c.status,
            step_results.c.latency_s,
            step_results.c.own_latency_s,
            runs.c.started_at,
        )
        .join(runs, runs.c.id == step_results.c.run_id)
        .where(
            runs.c.flow == flow,
            runs.c.variant == variant,
            runs.c.started_at >= since,
            runs.c.started_at < until,
            step_results.c.cleanup.is_(False),
            runs.c.maintenance.is_not(True),  # NULL: stored before windows existed
        )
        .order_by(runs.c.started_at, runs.c.id, step_results.c.position)
    )
    if location is not None:
        query = query.where(runs.c.location == location)
    out: dict[str, StepSamples] = {}
    for row in (await conn.execute(query)).all():
        entry = out.setdefault(row.name, StepSamples(step=row.name, kind=row.kind))
        entry.started_at.append(row.started_at)
        entry.latency_s.append(row.latency_s)
        entry.status.append(row.status)
        entry.own_latency_s.append(row.own_latency_s)
    return out


async def link_history(
    conn: AsyncConnection, pairs: Sequence[tuple[str, str]], limit: int
) -> dict[tuple[str, str, str], list[LinkPoint]]:
    """The last `limit` points of every hop of each (flow, variant), oldest first."""
    out: dict[tuple[str, str, str], list[LinkPoint]] = {}
    for flow, variant in pairs:
        recent = (
            select(runs.c.id)
            .where(runs.c.flow == flow, runs.c.variant == variant)
            .order_by(runs.c.started_at.desc(), runs.c.id.desc())
            .limit(limit)
            .subquery()
        )
        query = (
            select(
                step_results.c.name,
                step_results.c.status,
                step_results.c.latency_s,
                runs.c.started_at,
            )
            .join(runs, runs.c.id == step_results.c.run_id)
            .where(step_results.c.run_id.in_(select(recent.c.id)))
            .where(step_results.c.cleanup.is_(False))
            .order_by(runs.c.started_at, runs.c.id)
        )
        for row in (await conn.execute(query)).all():
            point = LinkPoint(row.started_at, row.latency_s, row.status)
            out.setdefault((flow, variant, row.name), []).append(point)
    return out


def window_row(window: Window) -> dict[str, Any]:
    return {
        "id": window.id,
        "flows": list(window.flows),
        "variants": list(window.variants),
        "start": window.start,
        "end": window.end,
        "reason": window.reason,
        "created_at": window.created_at if window.created_at is not None else window.start,
    }


def _window(row: _AnyRow) -> Window:
    return Window(
        id=row.id,
        flows=tuple(row.flows),
        variants=tuple(row.variants),
        start=row.start,
        end=row.end,
        reason=row.reason,
        source="api",
        created_at=row.created_at,
    )


def replace_end(window: Window, end: float) -> Window:
    return dataclasses.replace(window, end=end)


async def get_window(conn: AsyncConnection, window_id: str) -> Window | None:
    table = maintenance_windows
    row = (await conn.execute(select(table).where(table.c.id == window_id))).first()
    return None if row is None else _window(row)


async def load_windows(conn: AsyncConnection, ended_after: float) -> list[Window]:
    table = maintenance_windows
    query = select(table).where(table.c.end > ended_after).order_by(table.c.start, table.c.id)
    return [_window(row) for row in (await conn.execute(query)).all()]
