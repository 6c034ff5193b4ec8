"""The read-only HTTP API on the admin listener (/api/v1/...), and its OpenAPI document.

Query parameters are declared once and used both to parse requests and to write the document;
response bodies are pydantic models whose JSON schemas go into the document, so the document
says exactly what the routes accept and return.

What is where:
- `views`: what the API needs of a flow (`FlowLike`, `StepLike`; `FlowSource`, a list or a
  callable, so the answers follow a reload), the response bodies, and the views built from
  runs (`summary_of`, `flow_view`, `flow_views`).
- `params`: the query parameters (`Param`, the run and incident tables), their parsing and
  `BadRequest`.
- `routes`: the aiohttp handlers and `install_api_routes`, which adds them to the admin app.
- `maintenance`: `/api/v1/maintenance` (list, add, end windows) with its bodies.
- `openapi`: `API_PREFIX` and `openapi_document`, built from the tables and the body models.

Import from here; the modules import each other only in that order (views and params first,
then maintenance, then openapi, then routes), never back.
"""

from monitor.api.openapi import API_PREFIX, openapi_document
from monitor.api.params import MAX_LIMIT, BadRequest
from monitor.api.routes import install_api_routes
from monitor.api.views import (
    ErrorBody,
    FlowLike,
    FlowList,
    FlowSource,
    FlowView,
    HealthBody,
    LinkState,
    LinkStatus,
    StepInfo,
    StepLike,
    VariantState,
    current_flows,
    flow_view,
    flow_views,
    summary_of,
)

__all__ = [
    "API_PREFIX",
    "MAX_LIMIT",
    "BadRequest",
    "ErrorBody",
    "FlowLike",
    "FlowList",
    "FlowSource",
    "FlowView",
    "HealthBody",
    "LinkState",
    "LinkStatus",
    "StepInfo",
    "StepLike",
    "VariantState",
    "current_flows",
    "flow_view",
    "flow_views",
    "install_api_routes",
    "openapi_document",
    "summary_of",
]
