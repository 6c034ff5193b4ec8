"""Query parameters, declared once so that request parsing and the OpenAPI document agree."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from monitor.store.queries import CURSOR_PATTERN

MAX_LIMIT = 500

# Used with fullmatch: `$` alone would let a trailing newline through.
_INT = re.compile(r"-?[0-9]{1,18}")
_NUMBER = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?")


class BadRequest(Exception):
    """A request parameter the API does not accept; answered 400."""


@dataclass(frozen=True, slots=True)
class Param:
    """One query parameter: its JSON schema both checks a raw value and goes into the document."""

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


def _text(name: str, description: str) -> Param:
    return Param(name, {"type": "string"}, description)


_LIMIT = Param(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50},
    "Page size.",
)
_CURSOR = Param(
    "cursor",
    {"type": "string", "pattern": CURSOR_PATTERN},
    "Start after this position: `next_cursor` of the previous page, or `<unix seconds>~<id>`.",
)
RUN_PARAMS = (
    _text("flow", "Only runs of this flow."),
    _text("variant", "Only runs of this variant."),
    _text("location", "Only runs from this location."),
    Param(
        "outcome",
        {"type": "string", "enum": ["success", "failure", "aborted"]},
        "Only runs with this outcome.",
    ),
    Param("since", {"type": "number"}, "Only runs started at or after (unix seconds)."),
    Param("until", {"type": "number"}, "Only runs started before (unix seconds)."),
    _LIMIT,
    _CURSOR,
)
INCIDENT_PARAMS = (
    Param(
        "status",
        {"type": "string", "enum": ["open", "closed", "all"], "default": "all"},
        "Open incidents, closed ones, or all.",
    ),
    _text("flow", "Only incidents of this flow."),
    _text("variant", "Only incidents of this variant."),
    _text("location", "Only incidents seen from this location."),
    _LIMIT,
    _CURSOR,
)


def parse_query(request: web.Request, params: Sequence[Param]) -> dict[str, Any]:
    """The request's values of `params`, defaults filled in; raises BadRequest."""
    values: dict[str, Any] = {}
    for param in params:
        raw = request.query.get(param.name)
        if raw is None:
            if "default" in param.schema:
                values[param.name] = param.schema["default"]
            continue
        values[param.name] = param.parse(raw)
    return values
