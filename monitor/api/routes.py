"""The aiohttp handlers of /api/v1/*: HTTP in and out only; views and the store give the answers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from monitor.api.maintenance import install_maintenance_routes
from monitor.api.openapi import API_PREFIX, openapi_document
from monitor.api.params import INCIDENT_PARAMS, RUN_PARAMS, BadRequest, parse_query
from monitor.api.views import (
    ClusterView,
    ErrorBody,
    FlowList,
    FlowSource,
    current_flows,
    flow_views,
    standalone_view,
)
from monitor.cluster.settings import default_replica
from monitor.maintenance import MaintenanceBook
from monitor.results import RunResult
from monitor.store import BadCursor, IncidentPage, RunPage, Store


def _json(body: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(text=body.model_dump_json(), status=status)


def _error(status: int, message: str) -> web.Response:
    return _json(ErrorBody(error=message), status)


@dataclass(slots=True)
class _Api:
    store: Store | None
    flows: FlowSource
    last_runs: Mapping[tuple[str, str], RunResult]
    document: dict[str, Any] = field(default_factory=dict)
    cluster: Callable[[], dict[str, Any]] | None = None

    async def flows_handler(self, request: web.Request) -> web.Response:
        views = await flow_views(current_flows(self.flows), self.last_runs, self.store)
        return _json(FlowList(flows=views))

    async def runs_handler(self, request: web.Request) -> web.Response:
        store = self.store
        if store is None:
            return _error(503, "no store configured: run history is not kept")
        try:
            query = parse_query(request, RUN_PARAMS)
            # NUL cannot be stored (PostgreSQL refuses it), so such a filter matches nothing.
            if any("\x00" in v for v in query.values() if isinstance(v, str)):
                return _json(RunPage(runs=[], next_cursor=None))
            page = await store.list_runs(**query)
        except (BadRequest, BadCursor) as exc:
            return _error(400, str(exc))
        return _json(page)

    async def run_handler(self, request: web.Request) -> web.Response:
        if self.store is None:
            return _error(503, "no store configured: run history is not kept")
        run_id = request.match_info["run_id"]
        run = None if "\x00" in run_id else await self.store.get_run(run_id)
        if run is None:
            return _error(404, f"no run {run_id!r}")
        return _json(run)

    async def incidents_handler(self, request: web.Request) -> web.Response:
        store = self.store
        if store is None:
            return _error(503, "no store configured: incidents are not kept")
        try:
            query = parse_query(request, INCIDENT_PARAMS)
            if any("\x00" in v for v in query.values() if isinstance(v, str)):
                return _json(IncidentPage(incidents=[], next_cursor=None))
            status = query.pop("status")
            page = await store.list_incidents(status=None if status == "all" else status, **query)
        except (BadRequest, BadCursor) as exc:
            return _error(400, str(exc))
        return _json(page)

    async def cluster_handler(self, request: web.Request) -> web.Response:
        if self.cluster is None:
            return _json(standalone_view(default_replica(), current_flows(self.flows)))
        return _json(ClusterView.model_validate(self.cluster()))

    async def openapi_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.document)


def install_api_routes(
    app: web.Application,
    *,
    store: Store | None,
    flows: FlowSource,
    last_runs: Mapping[tuple[str, str], RunResult],
    bearer_auth: bool = True,
    cluster: Callable[[], dict[str, Any]] | None = None,
    maintenance: MaintenanceBook | None = None,
) -> None:
    """Add /api/v1/* to the admin app; `flows` is the configured flows (a callable to follow
    reloads); `bearer_auth` says whether the document requires a token; `cluster` describes
    the group (None: this replica runs alone); `maintenance` keeps the windows (default: in
    memory), checked against `flows`."""
    document = openapi_document(bearer_auth=bearer_auth)
    api = _Api(store, flows, last_runs, document, cluster)
    app.router.add_get(f"{API_PREFIX}/flows", api.flows_handler)
    app.router.add_get(f"{API_PREFIX}/runs", api.runs_handler)
    app.router.add_get(f"{API_PREFIX}/runs/{{run_id}}", api.run_handler)
    app.router.add_get(f"{API_PREFIX}/incidents", api.incidents_handler)
    app.router.add_get(f"{API_PREFIX}/cluster", api.cluster_handler)
    app.router.add_get(f"{API_PREFIX}/openapi.json", api.openapi_handler)
    book = maintenance if maintenance is not None else MaintenanceBook()
    install_maintenance_routes(app, book, lambda: current_flows(flows))
