"""One chai assertion (`to.eql(5)`, `to.be.a('string')`, `to.have.status(201)`) on one part of
the response, added to a request's checks; anything without a certain meaning is refused
with the reason."""

from __future__ import annotations

import http
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from monitor.importers.postman_checks import (
    STATUS_CODES,
    Checks,
    JsonPath,
    absent_at,
    json_path,
    schema_at,
)

EQUAL = {"eql", "equal", "equals", "eq", "eqls"}
_BELOW = {"below", "lessThan", "lt"}
_ABOVE = {"above", "greaterThan", "gt"}
_MOST = {"most", "lte", "lessThanOrEqual"}
_LEAST = {"least", "gte", "greaterThanOrEqual"}
_INCLUDE = {"include", "includes", "contain", "contains", "string"}
# chai-postman's response classes (pm.response.to.be.ok …) and the codes they accept.
_CLASSES: dict[str, Callable[[int], bool]] = {
    "ok": lambda c: c == 200, "accepted": lambda c: c == 202,
    "badRequest": lambda c: c == 400, "unauthorized": lambda c: c == 401,
    "forbidden": lambda c: c == 403, "notFound": lambda c: c == 404,
    "rateLimited": lambda c: c == 429, "info": lambda c: 100 <= c < 200,
    "success": lambda c: 200 <= c < 300, "redirection": lambda c: 300 <= c < 400,
    "clientError": lambda c: 400 <= c < 500, "serverError": lambda c: 500 <= c < 600,
    "error": lambda c: 400 <= c < 600,
}  # fmt: skip
_JSON_TYPES = {
    "string": "string", "number": "number", "boolean": "boolean", "object": "object",
    "array": "array", "null": "null",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Literal:
    """A value known when importing (a JS literal, or a template for a variable's value)."""

    value: Any
    template: bool = False  # a `{{ … }}` string standing for a variable's value


@dataclass(frozen=True, slots=True)
class Subject:
    """What an assertion looks at: the response, its code, latency, a header, the text, or a
    JSON value (and its length) at a path."""

    kind: str
    path: JsonPath = ()
    name: str = ""


@dataclass(frozen=True, slots=True)
class Assertion:
    name: str
    values: list[Literal | None] | None  # None: used as a property (`.to.be.true`)
    negate: bool


def apply_assertion(checks: Checks, subject: Subject, a: Assertion) -> str | None:
    """Add `a` on `subject` to `checks`; the reason it cannot be translated otherwise."""
    if a.values is not None and any(v is None for v in a.values):
        return f"{a.name}(…) compares with a value known only at run time"
    handler = _HANDLERS.get(subject.kind)
    if handler is None:
        return f"assertions on {subject.kind} are not translated"
    return handler(checks, subject, a)


def _args(a: Assertion) -> list[Any]:
    return [v.value for v in a.values or [] if v is not None]


def _template(a: Assertion) -> bool:
    return any(v is not None and v.template for v in a.values or [])


def _numeric(a: Assertion) -> Callable[[float], bool] | None:
    """The predicate of a numeric comparison (`below(5)`, `oneOf([…])`), or None."""
    args = _args(a)
    if _template(a):
        return None
    if a.name in EQUAL and len(args) == 1:
        return lambda x: x == args[0]
    if a.name == "oneOf" and len(args) == 1 and isinstance(args[0], list):
        return lambda x: x in args[0]
    if len(args) == 1 and isinstance(args[0], int | float) and not isinstance(args[0], bool):
        n = args[0]
        for names, test in (
            (_BELOW, lambda x: x < n), (_ABOVE, lambda x: x > n),
            (_MOST, lambda x: x <= n), (_LEAST, lambda x: x >= n),
        ):  # fmt: skip
            if a.name in names:
                return test
    if a.name == "within" and len(args) == 2:
        return lambda x: args[0] <= x <= args[1]
    return None


def _status_codes(a: Assertion) -> list[int] | None:
    if a.name == "status" and a.values is not None and len(a.values) == 1:
        want = _args(a)[0]
        if isinstance(want, str):  # a reason phrase: pm.response.to.have.status("Created")
            codes = [s.value for s in http.HTTPStatus if s.phrase.lower() == want.lower()]
            pred: Callable[[int], bool] = lambda c: c in codes  # noqa: E731
        else:
            pred = lambda c: c == want  # noqa: E731
    elif a.values is None and a.name in _CLASSES:
        pred = _CLASSES[a.name]
    else:
        return None
    return [c for c in STATUS_CODES if pred(c) != a.negate]


def _on_response(checks: Checks, _s: Subject, a: Assertion) -> str | None:
    codes = _status_codes(a)
    if codes is not None:
        return None if checks.want_status(codes) else "contradicts an earlier status assertion"
    args = _args(a)
    if a.negate:
        return f"a negated {a.name} on the response is not translated"
    if a.name == "header" and args and not _template(a):
        pattern = r"(?s:.*)" if len(args) == 1 else re.escape(str(args[1]))
        checks.want_header(str(args[0]), pattern)
        return None
    if a.name == "jsonSchema" and len(args) == 1 and isinstance(args[0], dict):
        checks.schemas.append(args[0])
        return None
    if a.name in ("json", "withBody") and a.values is None:
        checks.schemas.append({})  # only that the body is JSON
        return None
    if a.name == "jsonBody" and args and isinstance(args[0], str) and not _template(a):
        path = tuple(args[0].split("."))
        if len(args) == 1:
            checks.schemas.append(schema_at(path, {}))
        else:
            checks.json[json_path(path)] = args[1]
        return None
    if a.name == "body" and len(args) == 1 and isinstance(args[0], str) and not _template(a):
        checks.body.append((r"\A" + re.escape(args[0]) + r"\Z", True))
        return None
    return f"pm.response {a.name} is not translated"


def _on_code(checks: Checks, _s: Subject, a: Assertion) -> str | None:
    pred = _numeric(a)
    if pred is None:
        return f"{a.name} on the status code is not translated"
    codes = [c for c in STATUS_CODES if pred(c) != a.negate]
    return None if checks.want_status(codes) else "contradicts an earlier status assertion"


def _on_time(checks: Checks, _s: Subject, a: Assertion) -> str | None:
    args = _args(a)
    if a.negate or a.name not in _BELOW | _MOST or len(args) != 1:
        return f"{'not.' if a.negate else ''}{a.name} on the response time is not translated"
    checks.want_latency(float(args[0]))
    return None


def _on_header(checks: Checks, s: Subject, a: Assertion) -> str | None:
    args = _args(a)
    if _template(a):
        return "a header compared with a variable's value is not translated"
    pattern: str | None = None
    if a.name in ("exist", "ok") and a.values is None and not a.negate:
        pattern = r"(?s:.*)"
    elif a.name in EQUAL and len(args) == 1:
        pattern = re.escape(str(args[0]))
    elif a.name in _INCLUDE and len(args) == 1:
        pattern = r"(?s:.*)" + re.escape(str(args[0])) + r"(?s:.*)"
    elif a.name == "match" and len(args) == 1 and isinstance(args[0], re.Pattern):
        pattern = r"(?s:.*)(?:" + args[0].pattern + r")(?s:.*)"
    if pattern is None:
        return f"{a.name} on header {s.name} is not translated"
    if a.negate:
        if a.name in ("exist", "ok"):
            return f"header {s.name} must be absent: not translated"
        pattern = f"(?!{pattern}$)(?s:.*)"
    checks.want_header(s.name, pattern)
    return None


def _on_has_header(checks: Checks, s: Subject, a: Assertion) -> str | None:
    if a.name in ("true", "ok") and a.values is None and not a.negate:
        checks.want_header(s.name, r"(?s:.*)")
        return None
    return f"headers.has({s.name!r}) {a.name} is not translated"


def _on_text(checks: Checks, _s: Subject, a: Assertion) -> str | None:
    args = _args(a)
    if _template(a) or len(args) != 1:
        return f"{a.name} on the body text is not translated"
    if a.name in _INCLUDE and isinstance(args[0], str):
        checks.body.append((re.escape(args[0]), not a.negate))
    elif a.name == "match" and isinstance(args[0], re.Pattern):
        checks.body.append((args[0].pattern, not a.negate))
    elif a.name in EQUAL and isinstance(args[0], str):
        checks.body.append((r"\A" + re.escape(args[0]) + r"\Z", not a.negate))
    else:
        return f"{a.name} on the body text is not translated"
    return None


def _on_json(checks: Checks, s: Subject, a: Assertion) -> str | None:
    args = _args(a)
    if a.name in EQUAL and len(args) == 1 and not a.negate:
        checks.json[json_path(s.path)] = args[0]
        return None
    if a.values is None and a.name in ("true", "false", "null") and not a.negate:
        checks.json[json_path(s.path)] = {"true": True, "false": False, "null": None}[a.name]
        return None
    if _template(a):
        return f"{a.name} with a variable's value (only eql/equal are) is not translated"
    schema = _json_schema(s, a, args)
    if schema is None:
        return f"{'not.' if a.negate else ''}{a.name} on {json_path(s.path)} is not translated"
    checks.schemas.append(schema)
    return None


def _json_schema(s: Subject, a: Assertion, args: list[Any]) -> dict[str, Any] | None:
    """The schema for an assertion on a JSON value, negation included."""
    if a.values is None and a.name in ("exist", "undefined"):
        present = (a.name == "exist") != a.negate
        return schema_at(s.path, {}) if present else absent_at(s.path)
    if a.name == "property" and args and isinstance(args[0], str):
        inner = {} if len(args) == 1 else {"const": args[1]}
        if a.negate:
            return absent_at((*s.path, args[0])) if len(args) == 1 else None
        return schema_at((*s.path, args[0]), inner)
    leaf = _leaf(a, args)
    if leaf is None:
        return None
    return schema_at(s.path, {"not": leaf} if a.negate else leaf)


def _leaf(a: Assertion, args: list[Any]) -> dict[str, Any] | None:
    """The constraint an assertion puts on the value itself."""
    if a.name in ("a", "an") and len(args) == 1 and str(args[0]).lower() in _JSON_TYPES:
        return {"type": _JSON_TYPES[str(args[0]).lower()]}
    if a.name in EQUAL and len(args) == 1:
        return {"const": args[0]}
    if a.name in ("true", "false", "null") and a.values is None:
        return {"const": {"true": True, "false": False, "null": None}[a.name]}
    if a.name == "oneOf" and len(args) == 1 and isinstance(args[0], list):
        return {"enum": args[0]}
    if a.name in _INCLUDE and len(args) == 1:
        return _includes(args[0])
    if a.name == "match" and len(args) == 1 and isinstance(args[0], re.Pattern):
        return {"type": "string", "pattern": args[0].pattern}
    if a.name == "empty" and a.values is None:
        return {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "string", "maxLength": 0},
                          {"type": "object", "maxProperties": 0}]}  # fmt: skip
    if a.name in ("lengthOf", "length") and len(args) == 1 and isinstance(args[0], int):
        return _length(lambda lo, hi: (args[0], args[0]))
    return _number(a, args)


def _number(a: Assertion, args: list[Any]) -> dict[str, Any] | None:
    if len(args) == 2 and a.name == "within":
        return {"type": "number", "minimum": args[0], "maximum": args[1]}
    if len(args) != 1 or not isinstance(args[0], int | float) or isinstance(args[0], bool):
        return None
    for names, key in (
        (_BELOW, "exclusiveMaximum"), (_ABOVE, "exclusiveMinimum"),
        (_MOST, "maximum"), (_LEAST, "minimum"),
    ):  # fmt: skip
        if a.name in names:
            return {"type": "number", key: args[0]}
    return None


def _includes(want: Any) -> dict[str, Any]:
    """chai's include: a substring, an array member, or an object's subset."""
    options: list[dict[str, Any]] = [{"type": "array", "contains": {"const": want}}]
    if isinstance(want, str):
        options.append({"type": "string", "pattern": re.escape(want)})
    if isinstance(want, dict):
        options.append(
            {
                "type": "object",
                "properties": {k: {"const": v} for k, v in want.items()},
                "required": list(want),
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def _length(bounds: Callable[[int, int], tuple[int | None, int | None]]) -> dict[str, Any]:
    lo, hi = bounds(0, 0)
    array: dict[str, Any] = {"type": "array"}
    text: dict[str, Any] = {"type": "string"}
    if lo is not None:
        array["minItems"], text["minLength"] = lo, lo
    if hi is not None:
        array["maxItems"], text["maxLength"] = hi, hi
    return {"anyOf": [array, text]}


def _on_length(checks: Checks, s: Subject, a: Assertion) -> str | None:
    """`x.length` compared with a number: a bound on an array's or a string's length."""
    args = _args(a)
    if a.negate or len(args) != 1 or not isinstance(args[0], int) or _template(a):
        return f"{a.name} on {json_path(s.path)}.length is not translated"
    n = args[0]
    bounds = {
        **dict.fromkeys(EQUAL, (n, n)), **dict.fromkeys(_BELOW, (None, n - 1)),
        **dict.fromkeys(_ABOVE, (n + 1, None)), **dict.fromkeys(_MOST, (None, n)),
        **dict.fromkeys(_LEAST, (n, None)),
    }  # fmt: skip
    if a.name not in bounds:
        return f"{a.name} on {json_path(s.path)}.length is not translated"
    lo, hi = bounds[a.name]
    checks.schemas.append(schema_at(s.path, _length(lambda _a, _b: (lo, hi))))
    return None


_HANDLERS: dict[str, Callable[[Checks, Subject, Assertion], str | None]] = {
    "response": _on_response, "code": _on_code, "time": _on_time, "header": _on_header,
    "has_header": _on_has_header, "text": _on_text, "json": _on_json, "length": _on_length,
}  # fmt: skip
