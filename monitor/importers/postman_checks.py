"""The assertions and extractions a Postman request's test scripts add up to, and how they
become one step's `expect` and `extract` (several scripts and tests can constrain one request).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

JsonPath = tuple[str | int, ...]
_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
STATUS_CODES = range(100, 600)


def json_path(tokens: JsonPath) -> str:
    """`("a", 0, "b-c")` as the JSON path `$.a[0].'b-c'`."""
    out = "$"
    for tok in tokens:
        if isinstance(tok, int):
            out += f"[{tok}]"
        elif _PLAIN.match(tok):
            out += f".{tok}"
        else:
            out += ".'" + tok.replace("'", "\\'") + "'"
    return out


def schema_at(tokens: JsonPath, leaf: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema holding `leaf` at `tokens`, each step present and of the right type (as
    `pm.response.json().a.b` throws, failing the test, when `a` is missing)."""
    schema = leaf
    for tok in reversed(tokens):
        if isinstance(tok, int):
            schema = {"type": "array", "prefixItems": [{}] * tok + [schema], "minItems": tok + 1}
        else:
            schema = {"type": "object", "properties": {tok: schema}, "required": [tok]}
    return schema


def absent_at(tokens: JsonPath) -> dict[str, Any] | None:
    """A schema saying the value at `tokens` is missing (chai's `undefined`, `not.exist`)."""
    if not tokens or isinstance(tokens[-1], int):
        return None
    return schema_at(tokens[:-1], {"not": {"required": [tokens[-1]]}})


@dataclass(slots=True)
class Checks:
    """What one request must satisfy, gathered from every test script that applies to it."""

    status: list[int] | None = None  # None: not asserted (hopwatch's default, any 2xx)
    headers: dict[str, str] = field(default_factory=dict)
    json: dict[str, Any] = field(default_factory=dict)
    schemas: list[dict[str, Any]] = field(default_factory=list)
    body: list[tuple[str, bool]] = field(default_factory=list)  # (regex, must match)
    max_latency_ms: float | None = None
    extract: dict[str, dict[str, str]] = field(default_factory=dict)  # variable → rule

    def want_status(self, codes: list[int]) -> bool:
        """Narrow the wanted codes (every assertion must hold); False when none is left."""
        narrowed = codes if self.status is None else [c for c in self.status if c in codes]
        if not narrowed:
            return False
        self.status = narrowed
        return True

    def want_header(self, name: str, pattern: str) -> bool:
        known = {k.lower(): k for k in self.headers}
        if name.lower() in known:
            old = known[name.lower()]
            self.headers[old] = f"(?=(?:{self.headers[old]})$)(?:{pattern})"
            return True
        self.headers[name] = pattern
        return True

    def want_latency(self, ms: float) -> None:
        self.max_latency_ms = ms if self.max_latency_ms is None else min(ms, self.max_latency_ms)

    def expect(self) -> dict[str, Any]:
        """The step's `expect` mapping (only what was asserted)."""
        out: dict[str, Any] = {}
        if self.status is not None:
            out["status"] = self.status[0] if len(self.status) == 1 else self.status
        if self.headers:
            out["headers"] = dict(self.headers)
        if self.json:
            out["json"] = dict(self.json)
        if self.body:
            out["body"] = _body_pattern(self.body)
        if self.schemas:
            merged = self.schemas[0]
            for schema in self.schemas[1:]:
                merged = merge_schemas(merged, schema)
            out["json_schema"] = merged
        if self.max_latency_ms is not None:
            out["max_latency"] = f"{self.max_latency_ms:g}ms"
        return out


_PATH_KEYS = {"type", "properties", "required"}


def merge_schemas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Both schemas in one: objects built by `schema_at` merge key by key (so the file reads
    as one shape); anything else is joined with allOf."""
    if _is_path(a) and _is_path(b):
        props = dict(a["properties"])
        for key, sub in b["properties"].items():
            props[key] = merge_schemas(props[key], sub) if key in props else sub
        required = list(dict.fromkeys([*a["required"], *b["required"]]))
        return {"type": "object", "properties": props, "required": required}
    if a == {}:
        return b
    if b == {} or a == b:
        return a
    left = a["allOf"] if set(a) == {"allOf"} else [a]
    return {"allOf": [*left, b]}


def _is_path(schema: dict[str, Any]) -> bool:
    return set(schema) == _PATH_KEYS and schema["type"] == "object"


def _body_pattern(parts: list[tuple[str, bool]]) -> str:
    """One regex `search` finds exactly when every part holds (lookaheads from the start)."""
    if len(parts) == 1 and parts[0][1]:
        return parts[0][0]
    ahead = "".join(
        ("(?=" if must else "(?!") + r"[\s\S]*?(?:" + pattern + "))" for pattern, must in parts
    )
    return r"\A" + ahead
