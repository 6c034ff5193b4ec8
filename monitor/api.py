"""The read-only HTTP API on the admin listener (/api/v1/...), and its OpenAPI document.

Query parameters are declared once (`_Param`) and used both to parse requests and to write the
document; response bodies are pydantic models whose JSON schemas go into the document, so the
document says exactly what the routes accept and return.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from monitor.results import RunResult
from monitor.store import BadCursor, IncidentPage, RunDetail, RunPage, RunSummary, Store
from monitor.store.queries import CURSOR_PATTERN

API_PREFIX = "/api/v1"
MAX_LIMIT = 500

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


# --- query parameters ----------------------------------------------------------------------

# Used with fullmatch: `$` alone would let a trailing newline through.
_INT = re.compile(r"-?[0-9]{1,18}")
_NUMBER = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?")


class BadRequest(Exception):
    """A request parameter the API does not accept; answered 400."""


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    schema: dict[str, Any]
    description: str

    def parse(self, raw: str) -> Any:
        kind = self.schema["type"]
        if kind == "integer":
            return self._integer(raw)
        if kind == "number":
            return self._number(raw)
        if "enum" in self.schema and raw not in self.schema["enum"]:
            raise BadRequest(f"{self.name}: {raw!r} is not one of {self.schema['enum']}")
        return raw

    def _integer(self, raw: str) -> int:
        if not _INT.fullmatch(raw):
            raise BadRequest(f"{self.name}: {raw!r} is not an integer")
        value = int(raw)
        low, high = self.schema.get("minimum"), self.schema.get("maximum")
        if (low is not None and value < low) or (high is not None and value > high):
            raise BadRequest(f"{self.name}: {value} is not within [{low}, {high}]")
        return value

    def _number(self, raw: str) -> float:
        value = float(raw) if _NUMBER.fullmatch(raw) else math.nan
        if not math.isfinite(value):
            raise BadRequest(f"{self.name}: {raw!r} is not a number (unix seconds)")
        return value

    def openapi(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": "query",
            "required": False,
            "description": self.description,
            "schema": self.schema,
        }


def _text(name: str, description: str) -> _Param:
    return _Param(name, {"type": "string"}, description)


_LIMIT = _Param(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50},
    "Page size.",
)
_CURSOR = _Param(
    "cursor",
    {"type": "string", "pattern": CURSOR_PATTERN},
    "Start after this position: `next_cursor` of the previous page, or `<unix seconds>~<id>`.",
)
_RUN_PARAMS = (
    _text("flow", "Only runs of this flow."),
    _text("variant", "Only runs of this variant."),
    _text("location", "Only runs from this location."),
    _Param(
        "outcome",
        {"type": "string", "enum": ["success", "failure", "aborted"]},
        "Only runs with this outcome.",
    ),
    _Param("since", {"type": "number"}, "Only runs started at or after (unix seconds)."),
    _Param("until", {"type": "number"}, "Only runs started before (unix seconds)."),
    _LIMIT,
    _CURSOR,
)
_INCIDENT_PARAMS = (
    _Param(
        "status",
        {"type": "string", "enum": ["open", "closed", "all"], "default": "all"},
        "Open incidents, closed ones, or all.",
    ),
    _text("flow", "Only incidents of this flow."),
    _text("variant", "Only incidents of this variant."),
    _LIMIT,
    _CURSOR,
)


def _parse(request: web.Request, params: Sequence[_Param]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for param in params:
        raw = request.query.get(param.name)
        if raw is None:
            if "default" in param.schema:
                values[param.name] = param.schema["default"]
            continue
        values[param.name] = param.parse(raw)
    return values


# --- handlers ------------------------------------------------------------------------------


def _json(body: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(text=body.model_dump_json(), status=status)


def _error(status: int, message: str) -> web.Response:
    return _json(ErrorBody(error=message), status)


@dataclass(slots=True)
class _Api:
    store: Store | None
    flows: Sequence[FlowLike]
    last_runs: Mapping[tuple[str, str], RunResult]
    document: dict[str, Any] = field(default_factory=dict)

    async def flows_handler(self, request: web.Request) -> web.Response:
        views = await flow_views(self.flows, self.last_runs, self.store)
        return _json(FlowList(flows=views))

    async def runs_handler(self, request: web.Request) -> web.Response:
        store = self.store
        if store is None:
            return _error(503, "no store configured: run history is not kept")
        try:
            query = _parse(request, _RUN_PARAMS)
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
            query = _parse(request, _INCIDENT_PARAMS)
            if any("\x00" in v for v in query.values() if isinstance(v, str)):
                return _json(IncidentPage(incidents=[], next_cursor=None))
            status = query.pop("status")
            page = await store.list_incidents(status=None if status == "all" else status, **query)
        except (BadRequest, BadCursor) as exc:
            return _error(400, str(exc))
        return _json(page)

    async def openapi_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.document)


def install_api_routes(
    app: web.Application,
    *,
    store: Store | None,
    flows: Sequence[FlowLike],
    last_runs: Mapping[tuple[str, str], RunResult],
    bearer_auth: bool = True,
) -> None:
    """Add /api/v1/* to the admin app; `bearer_auth` says whether the document requires a token."""
    api = _Api(store, flows, last_runs, openapi_document(bearer_auth=bearer_auth))
    app.router.add_get(f"{API_PREFIX}/flows", api.flows_handler)
    app.router.add_get(f"{API_PREFIX}/runs", api.runs_handler)
    app.router.add_get(f"{API_PREFIX}/runs/{{run_id}}", api.run_handler)
    app.router.add_get(f"{API_PREFIX}/incidents", api.incidents_handler)
    app.router.add_get(f"{API_PREFIX}/openapi.json", api.openapi_handler)


# --- the OpenAPI document ------------------------------------------------------------------

_REF = "#/components/schemas/{model}"


def _content(model: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(model=model)}}}


def _responses(ok: str, ok_model: str, *codes: int) -> dict[str, Any]:
    texts = {
        400: "A parameter was not understood.",
        404: "No such run.",
        503: "No store is configured.",
    }
    out: dict[str, Any] = {"200": {"description": ok, "content": _content(ok_model)}}
    for code in codes:
        out[str(code)] = {"description": texts[code], "content": _content("ErrorBody")}
    return out


def _paths() -> dict[str, Any]:
    return {
        f"{API_PREFIX}/flows": {
            "get": {
                "operationId": "listFlows",
                "summary": "Flows and the state of each link in each variant's latest run.",
                "responses": _responses("The configured flows.", "FlowList"),
            }
        },
        f"{API_PREFIX}/runs": {
            "get": {
                "operationId": "listRuns",
                "summary": "Stored runs, newest first.",
                "parameters": [p.openapi() for p in _RUN_PARAMS],
                "responses": _responses("A page of runs.", "RunPage", 400, 503),
            }
        },
        f"{API_PREFIX}/runs/{{run_id}}": {
            "get": {
                "operationId": "getRun",
                "summary": "One run: hops, timings, reasons, trace id.",
                "parameters": [
                    {
                        "name": "run_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                    }
                ],
                "responses": _responses("The run.", "RunDetail", 404, 503),
            }
        },
        f"{API_PREFIX}/incidents": {
            "get": {
                "operationId": "listIncidents",
                "summary": "Incidents (broken links), most recently opened first.",
                "parameters": [p.openapi() for p in _INCIDENT_PARAMS],
                "responses": _responses("A page of incidents.", "IncidentPage", 400, 503),
            }
        },
        f"{API_PREFIX}/openapi.json": {
            "get": {
                "operationId": "getOpenApi",
                "summary": "This document.",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1 document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness: the process serves requests. Needs no token.",
                "security": [],
                "responses": {"200": {"description": "Alive.", "content": _content("HealthBody")}},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness: the monitor is running its flows. Needs no token.",
                "security": [],
                "responses": {
                    "200": {"description": "Ready.", "content": _content("HealthBody")},
                    "503": {"description": "Not ready yet.", "content": _content("HealthBody")},
                },
            }
        },
    }


def openapi_document(*, bearer_auth: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the admin listener's API."""
    _, schemas = models_json_schema(
        [
            (model, "serialization")
            for model in (FlowList, RunPage, RunDetail, IncidentPage, ErrorBody, HealthBody)
        ],
        ref_template=_REF,
    )
    paths = _paths()
    if bearer_auth:
        for path, item in paths.items():
            if path.startswith(API_PREFIX):
                item["get"]["responses"]["401"] = {
                    "description": "Missing or wrong token.",
                    "content": _content("ErrorBody"),
                }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "hopwatch admin API",
            "version": "1",
            "description": "Run history, link states and incidents of a hopwatch monitor.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Required unless the admin listener is bound to loopback.",
                }
            },
        },
    }
    if bearer_auth:
        document["security"] = [{"bearerAuth": []}]
    return document
