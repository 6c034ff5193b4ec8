"""The OpenAPI document, built from the same parameter tables and body models the routes use."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from monitor.api.maintenance import (
    MAINTENANCE_PATH,
    MaintenanceList,
    MaintenanceRequest,
    MaintenanceWindowView,
)
from monitor.api.params import INCIDENT_PARAMS, RUN_PARAMS
from monitor.api.views import ClusterView, ErrorBody, FlowList, HealthBody
from monitor.store import IncidentPage, RunDetail, RunPage

# The routes (monitor/api/routes.py) live under this prefix; the document spells their paths.
API_PREFIX = "/api/v1"

_REF = "#/components/schemas/{model}"


def _content(model: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(model=model)}}}


def _responses(ok: str, ok_model: str, *codes: int) -> dict[str, Any]:
    texts = {
        400: "A parameter was not understood.",
        404: "No such run.",
        503: "No store is configured.",
    }
    texts.update(_MAINTENANCE_TEXTS if ok_model.startswith("Maintenance") else {})
    out: dict[str, Any] = {"200": {"description": ok, "content": _content(ok_model)}}
    for code in codes:
        out[str(code)] = {"description": texts[code], "content": _content("ErrorBody")}
    return out


_MAINTENANCE_TEXTS = {
    400: "The body is not JSON or not of the schema; the error says why.",
    422: "Not a window to keep (unknown flows, an end in the past, ...); the error says why.",
    404: "No such window.",
    409: "The window is declared in a flow file: edit the file.",
    503: "The store could not keep the change.",
}


def _maintenance_paths() -> dict[str, Any]:
    created = _responses("The window added.", "MaintenanceWindowView", 400, 422, 503)
    created["201"] = created.pop("200")
    return {
        MAINTENANCE_PATH: {
            "get": {
                "operationId": "listMaintenance",
                "summary": "Active and upcoming maintenance windows, soonest first.",
                "responses": _responses("The windows.", "MaintenanceList"),
            },
            "post": {
                "operationId": "addMaintenance",
                "summary": "Add a maintenance window: runs go on, marked, but open no incident.",
                "requestBody": {"required": True, "content": _content("MaintenanceRequest")},
                "responses": created,
            },
        },
        f"{MAINTENANCE_PATH}/{{window_id}}": {
            "delete": {
                "operationId": "endMaintenance",
                "summary": "End a runtime window now (one not started yet is cancelled).",
                "parameters": [
                    {
                        "name": "window_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                    }
                ],
                "responses": _responses(
                    "The window, ended.", "MaintenanceWindowView", 404, 409, 503
                ),
            }
        },
    }


def _paths() -> dict[str, Any]:
    return _maintenance_paths() | {
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
                "parameters": [p.openapi() for p in RUN_PARAMS],
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
                "parameters": [p.openapi() for p in INCIDENT_PARAMS],
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
        f"{API_PREFIX}/cluster": {
            "get": {
                "operationId": "getCluster",
                "summary": "The replicas sharing the flows, and which flows each runs.",
                "responses": _responses("The group as of the last rebalance.", "ClusterView"),
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
            for model in (
                FlowList,
                RunPage,
                RunDetail,
                IncidentPage,
                ErrorBody,
                HealthBody,
                ClusterView,
                MaintenanceList,
                MaintenanceWindowView,
            )
        ]
        + [(MaintenanceRequest, "validation")],
        ref_template=_REF,
    )
    paths = _paths()
    if bearer_auth:
        for path, item in paths.items():
            if path.startswith(API_PREFIX):
                for operation in item.values():
                    operation["responses"]["401"] = {
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
