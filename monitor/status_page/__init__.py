"""The status page at / on the admin listener: link grid, open incidents, recent runs, waterfalls,
and the evidence failed hops kept (a browser step's screenshot).

Server-rendered with Jinja2 (autoescaped) and inline SVG; a few lines of inline JS refresh the
live part of the page. Reads the same data as the API: the runner's last results and the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jinja2
from aiohttp import web

from monitor.api import FlowSource, FlowView, current_flows, flow_views
from monitor.maintenance import MaintenanceBook, Window
from monitor.results import RunResult
from monitor.status_page.svg import Spark, format_seconds, slow_note, sparkline, waterfall
from monitor.store import ArtifactInfo, IncidentView, RunDetail, RunSummary, Store

log = logging.getLogger(__name__)

# Evidence is served as what it is only when it is an image; anything else is a download.
_SHOWN_MEDIA = frozenset({"image/png", "image/jpeg"})

__all__ = ["install_status_routes"]


def _timestamp(unix: float | None) -> str:
    if unix is None:
        return "\u2013"  # an en dash: "no value"
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ago(unix: float | None, now: float) -> str:
    if unix is None:
        return "\u2013"  # an en dash: "no value"
    seconds = max(now - unix, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def make_environment() -> jinja2.Environment:
    """The page's template environment: autoescaped, strict about undefined names."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("monitor.status_page", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["ts"] = _timestamp
    env.filters["secs"] = format_seconds
    env.globals["ago"] = _ago
    env.globals["evidence"] = {}  # a run page's kept artifacts by hop position: none unless given
    return env


@dataclass(slots=True)
class _Overview:
    flows: list[FlowView]
    sparks: dict[tuple[str, str, str], Spark | None]
    slow: dict[tuple[str, str, str], str]  # (flow, variant, step) → why it reads slow
    incidents: list[IncidentView]
    runs: list[RunSummary]
    store_error: str | None
    maintenance: list[Window] = field(default_factory=list)  # active and upcoming


@dataclass(slots=True)
class _StatusPage:
    store: Store | None
    flows: FlowSource
    last_runs: Mapping[tuple[str, str], RunResult]
    refresh_s: float
    env: jinja2.Environment
    maintenance: MaintenanceBook | None = None

    def _render(self, template: str, status: int = 200, **context: Any) -> web.Response:
        html = self.env.get_template(template).render(
            now=time.time(), refresh_s=self.refresh_s, has_store=self.store is not None, **context
        )
        return web.Response(text=html, status=status, content_type="text/html")

    async def index(self, request: web.Request) -> web.Response:
        overview = await self._overview()
        return self._render("index.html.j2", view=overview)

    async def _overview(self) -> _Overview:
        flows = current_flows(self.flows)  # once: one reload-consistent list per page
        views = await flow_views(flows, self.last_runs, self.store)
        overview = _Overview(views, {}, {}, [], [], None)
        if self.maintenance is not None:
            overview.maintenance = self.maintenance.windows()
        if self.store is None:
            self._mark_slow(overview, {})
            return overview
        pairs = [(f.name, v.variant) for f in views for v in f.variants]
        try:
            history = await self.store.link_history(pairs, 30)
            overview.incidents = (await self.store.list_incidents(status="open")).incidents
            overview.runs = (await self.store.list_runs(limit=25)).runs
        except Exception as exc:  # show what we have; the store may come back
            log.warning("status page: store unavailable: %s", exc)
            overview.store_error = f"{type(exc).__name__}: {exc}"
            return overview
        overview.sparks = {key: sparkline(points) for key, points in history.items()}
        # only links the configuration has: a renamed flow's old incident is not this page's
        configured = {
            (f.name, variant, step.name)
            for f in flows
            for variant in f.variants or {"default": None}
            for step in f.steps
        }
        overview.incidents = [
            i for i in overview.incidents if (i.flow, i.variant, i.step) in configured
        ]
        self._mark_slow(overview, history)
        return overview

    @staticmethod
    def _mark_slow(overview: _Overview, history: Mapping[tuple[str, str, str], Any]) -> None:
        for flow in overview.flows:
            for variant in flow.variants:
                for link in variant.links:
                    if link.status != "passed":
                        continue
                    key = (flow.name, variant.variant, link.step)
                    note = slow_note(link.latency_s, history.get(key, []), flow.timeout_s)
                    if note is not None:
                        overview.slow[key] = note

    async def run(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        run = self._in_memory(run_id)
        if run is None and self.store is not None and "\x00" not in run_id:
            try:
                run = await self.store.get_run(run_id)
            except Exception as exc:
                return self._render("missing.html.j2", 503, message=f"store unavailable: {exc}")
        if run is None:
            return self._render("missing.html.j2", 404, message=f"no run {run_id!r}")
        evidence: dict[int, list[ArtifactInfo]] = {}
        for found in await self._artifacts(run_id):
            evidence.setdefault(found.position, []).append(found)
        return self._render("run.html.j2", run=run, fall=waterfall(run), evidence=evidence)

    def _in_memory(self, run_id: str) -> RunDetail | None:
        result = self._last(run_id)
        if result is None:
            return None
        return RunDetail.model_validate({**result.to_dict(), "replica": result.replica})

    def _last(self, run_id: str) -> RunResult | None:
        for result in self.last_runs.values():
            if result.run_id == run_id:
                return result
        return None

    async def _artifacts(self, run_id: str) -> list[ArtifactInfo]:
        result = self._last(run_id)
        if result is not None:
            return [
                ArtifactInfo(position=i, name=a.name, media_type=a.media_type, size=len(a.data))
                for i, step in enumerate(result.steps)
                for a in step.artifacts
            ]
        if self.store is None or "\x00" in run_id:
            return []
        try:
            return await self.store.artifacts(run_id)
        except Exception as exc:  # the page shows the run; its evidence may come back
            log.warning("status page: artifacts of %s unavailable: %s", run_id, exc)
            return []

    async def artifact(self, request: web.Request) -> web.StreamResponse:
        run_id, name = request.match_info["run_id"], request.match_info["name"]
        position = int(request.match_info["position"])
        found = self._artifact_in_memory(run_id, position, name)
        if found is None and self.store is not None and "\x00" not in run_id + name:
            try:
                found = await self.store.artifact(run_id, position, name)
            except Exception as exc:
                raise web.HTTPServiceUnavailable(text=f"store unavailable: {exc}") from None
        if found is None:
            raise web.HTTPNotFound(text="no such artifact (the store keeps the newest only)")
        media, data = found
        return web.Response(
            body=data,
            content_type=media if media in _SHOWN_MEDIA else "application/octet-stream",
            headers={
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'",
                "Cache-Control": "private, max-age=3600",
            },
        )

    def _artifact_in_memory(
        self, run_id: str, position: int, name: str
    ) -> tuple[str, bytes] | None:
        result = self._last(run_id)
        if result is None or not 0 <= position < len(result.steps):
            return None
        for a in result.steps[position].artifacts:
            if a.name == name:
                return a.media_type, a.data
        return None


def install_status_routes(
    app: web.Application,
    *,
    store: Store | None,
    flows: FlowSource,
    last_runs: Mapping[tuple[str, str], RunResult],
    refresh_s: float = 10.0,
    maintenance: MaintenanceBook | None = None,
) -> None:
    """Add the status page (`/`) and run waterfalls (`/runs/{run_id}`) to the admin app;
    `flows` is the configured flows (a callable to follow reloads); `maintenance` lists the
    active and upcoming windows."""
    page = _StatusPage(store, flows, last_runs, refresh_s, make_environment(), maintenance)
    app.router.add_get("/", page.index)
    app.router.add_get("/runs/{run_id}", page.run)
    app.router.add_get(r"/runs/{run_id}/artifacts/{position:\d{1,4}}/{name}", page.artifact)
