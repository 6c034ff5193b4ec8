"""`/api/v1/maintenance`: list, add and end maintenance windows; bodies typed for the document."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from monitor.api.views import ErrorBody, FlowLike
from monitor.maintenance import (
    DeclaredWindow,
    MaintenanceBook,
    UnknownWindow,
    Window,
    parse_time,
    rfc3339,
)
from monitor.maintenance.windows import MAX_REASON, TimeValue
from probes import untrusted_json

log = logging.getLogger(__name__)

MAINTENANCE_PATH = "/api/v1/maintenance"
MAX_NAMES = 1000


class MaintenanceRequest(BaseModel):
    """A window to add: flows and/or variants, until `end`; `start` defaults to now."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flows: list[str] = Field(
        default_factory=list, max_length=MAX_NAMES, description="Flows; default every flow."
    )
    variants: list[str] = Field(
        default_factory=list, max_length=MAX_NAMES, description="Variants; default every variant."
    )
    start: TimeValue | None = Field(
        default=None, description="RFC 3339 with an offset, or unix seconds; default now."
    )
    end: TimeValue = Field(
        description="RFC 3339 with an offset, or unix seconds; after start and after now."
    )
    reason: str = Field(min_length=1, max_length=MAX_REASON, description="Why; shown everywhere.")

    @field_validator("start", "end", mode="before")
    @classmethod
    def _time(cls, value: Any) -> float | None:
        return None if value is None else parse_time(value)


class MaintenanceWindowView(BaseModel):
    """One window (a scheduled declaration shows as its concrete occurrences)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="End it with DELETE .../maintenance/{id} (runtime windows).")
    flows: list[str] = Field(description="Flows it covers; empty: every flow.")
    variants: list[str] = Field(description="Variants it covers; empty: every variant.")
    start: float = Field(description="Unix seconds.")
    end: float = Field(description="Unix seconds.")
    start_time: str = Field(description="`start` in RFC 3339 (UTC).")
    end_time: str = Field(description="`end` in RFC 3339 (UTC).")
    reason: str
    source: Literal["api", "config"] = Field(description="Added at run time, or a flow file's.")
    status: Literal["upcoming", "active", "ended"]


class MaintenanceList(BaseModel):
    """Active and upcoming windows, soonest first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    windows: list[MaintenanceWindowView]


def window_view(window: Window, now: float) -> MaintenanceWindowView:
    return MaintenanceWindowView(
        id=window.id,
        flows=list(window.flows),
        variants=list(window.variants),
        start=window.start,
        end=window.end,
        start_time=rfc3339(window.start),
        end_time=rfc3339(window.end),
        reason=window.reason,
        source=window.source,
        status=window.status(now),
    )


def _json(body: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(text=body.model_dump_json(), status=status)


def _error(status: int, message: str) -> web.Response:
    return _json(ErrorBody(error=message), status)


@dataclass(slots=True)
class _Maintenance:
    book: MaintenanceBook
    flows: Callable[[], Sequence[FlowLike]]

    async def list_handler(self, request: web.Request) -> web.Response:
        now = self.book.clock()
        views = [window_view(w, now) for w in self.book.windows(now)]
        return _json(MaintenanceList(windows=views))

    async def add_handler(self, request: web.Request) -> web.Response:
        try:
            body = untrusted_json.loads(await request.read() or b"null")
            asked = MaintenanceRequest.model_validate(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, _problem(exc))
        now = time.time()
        start = now if asked.start is None else asked.start
        problem = self._check(asked, start, now)
        if problem is not None:  # well-formed, but not a window this monitor can keep
            return _error(422, problem)
        try:
            window = await self.book.add(
                flows=asked.flows, variants=asked.variants, start=start, end=asked.end,
                reason=asked.reason,
            )  # fmt: skip
        except Exception as exc:  # the store is away: nothing was added
            log.warning("maintenance window not added: store unavailable: %s", exc)
            return _error(503, f"the store could not keep the window: {type(exc).__name__}")
        return _json(window_view(window, now), 201)

    def _check(self, asked: MaintenanceRequest, start: float, now: float) -> str | None:
        if not asked.flows and not asked.variants:
            return "name the flows and/or variants the window covers"
        if asked.end <= now:
            return "end is in the past: the window would cover nothing"
        if asked.end <= start:
            return "end must be after start"
        flows = {f.name: f for f in self.flows()}
        unknown = [name for name in asked.flows if name not in flows]
        if unknown:
            return f"unknown flows: {', '.join(map(repr, unknown))}"
        covered = [flows[name] for name in asked.flows] or list(flows.values())
        variants = {v for f in covered for v in (f.variants or {"default": None})}
        missing = [name for name in asked.variants if name not in variants]
        if missing:
            return f"no flow it covers has variants: {', '.join(map(repr, missing))}"
        return None

    async def end_handler(self, request: web.Request) -> web.Response:
        window_id = request.match_info["window_id"]
        if "\x00" in window_id:  # no id has one (PostgreSQL would refuse to look)
            return _error(404, f"no maintenance window {window_id!r}")
        try:
            window = await self.book.end(window_id)
        except UnknownWindow as exc:
            return _error(404, str(exc))
        except DeclaredWindow as exc:
            return _error(409, str(exc))
        except Exception as exc:
            log.warning("maintenance window not ended: store unavailable: %s", exc)
            return _error(503, f"the store could not end the window: {type(exc).__name__}")
        return _json(window_view(window, self.book.clock()))


def _problem(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for error in exc.errors(include_url=False):
            where = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {message}" if where else message)
        return "; ".join(parts)
    return f"the body is not JSON: {exc}"


def install_maintenance_routes(
    app: web.Application, book: MaintenanceBook, flows: Callable[[], Sequence[FlowLike]]
) -> None:
    """GET and POST /api/v1/maintenance, DELETE /api/v1/maintenance/{id}."""
    api = _Maintenance(book, flows)
    app.router.add_get(MAINTENANCE_PATH, api.list_handler)
    app.router.add_post(MAINTENANCE_PATH, api.add_handler)
    app.router.add_delete(f"{MAINTENANCE_PATH}/{{window_id}}", api.end_handler)
