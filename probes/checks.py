"""Assertions and extraction shared by every kind that looks at a response, delivery or record.

"The response is wrong" (AssertionFailed, HttpStatusError, ExtractFailed) is kept apart from
"could not check" (errors raised by the transport, translated in each kind).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Annotated, Any, Final, TypeVar

import jsonschema
from jsonpath_ng import jsonpath as jsonpath_ast
from jsonpath_ng.exceptions import JsonPathParserError
from jsonpath_ng.ext import parse as jsonpath_parse  # type: ignore[attr-defined]
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from probes import untrusted_json
from probes.base import StepContext, Untrusted
from probes.durations import Duration
from probes.errors import AssertionFailed, ExtractFailed, HttpStatusError

_MISSING = object()
# A response the flow asked for may be big; its nesting is what must stay bounded.
_MAX_JSON_BYTES: Final = 64 * 1024 * 1024


@lru_cache(maxsize=4096)
def _compiled_path(path: str) -> Any:
    return jsonpath_parse(path)


def validate_json_path(path: str) -> str:
    """Refuse a JSON path that does not parse, at config time rather than at run time."""
    try:
        _compiled_path(path)
    except (JsonPathParserError, Exception) as exc:
        raise ValueError(f"bad JSON path {path!r}: {exc}") from exc
    return path


PathsT = TypeVar("PathsT", bound=Mapping[str, Any])


def validate_json_paths(paths: PathsT) -> PathsT:
    """Refuse a mapping keyed by JSON paths when one of them does not parse."""
    for path in paths:
        validate_json_path(path)
    return paths


# Mark a `JSON path → wanted value` field: `Annotated[dict[str, Any], JSON_PATH_KEYS]`.
JSON_PATH_KEYS = AfterValidator(validate_json_paths)


def json_path_get(doc: Any, path: str) -> list[Any]:
    """Every value at `path` in `doc` (JSONPath, e.g. `$.items[0].id`); empty when none."""
    return path_reader(path)(doc)


PathReader = Callable[[Any], list[Any]]
_NOT_SET: Final = object()


@lru_cache(maxsize=4096)
def path_reader(path: str) -> PathReader:
    """`json_path_get` for one path: plain dictionary look-ups when the path is a chain of
    names (`$.data.order_id`, the common case, many times cheaper), else jsonpath-ng."""
    compiled = _compiled_path(path)
    names = _plain_names(compiled)
    if names is None or jsonpath_ast.auto_id_field is not None:
        return lambda doc: [match.value for match in compiled.find(doc)]

    def read(doc: Any) -> list[Any]:
        value = doc
        for name in names:
            try:  # as jsonpath-ng's Fields does: anything with .get() is an object
                value = value.get(name, _NOT_SET)
            except (TypeError, AttributeError):
                return []
            if value is _NOT_SET:
                return []
        return [value]

    return read


def _plain_names(node: Any) -> tuple[str, ...] | None:
    """The names of a path made only of `$` (leftmost) and single plain field names."""
    if type(node) is jsonpath_ast.Root:
        return ()
    if type(node) is jsonpath_ast.Fields:
        fields = node.fields
        plain = len(fields) == 1 and not getattr(node, "_deprecated_wildcard_use", True)
        return (fields[0],) if plain else None
    if type(node) is jsonpath_ast.Child:
        left = _plain_names(node.left)
        right = _plain_names(node.right) if type(node.right) is jsonpath_ast.Fields else None
        return None if left is None or right is None else left + right
    return None


def same_value(found: Any, want: Any) -> bool:
    """Whether a JSON value equals a wanted one, letting a rendered template (always text)
    stand for a number, bool or null ("42" for 42.0, "true" for true) while never taking
    a bool for a number (true is not 1)."""
    if isinstance(want, str):
        if isinstance(found, str):
            return found == want
        # A float taken by an earlier step renders as Python does ("3.0"): accept that too.
        return as_text(found) == want or (isinstance(found, float) and str(found) == want)
    if isinstance(want, bool) or isinstance(found, bool):
        return type(found) is type(want) and found == want
    return bool(found == want)


def as_text(value: Any) -> str:
    """How a JSON scalar reads in a template: true, 42, null (not Python's True, 42.0, None)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def parse_json(body: bytes) -> Any:
    """The body as JSON, or _MISSING when it is not JSON (or nests or weighs past the limits)."""
    try:
        return untrusted_json.loads(body, max_bytes=_MAX_JSON_BYTES)
    except untrusted_json.NotJson:
        return _MISSING


def excerpt(body: bytes, limit: int = 2048) -> str:
    """A bounded, printable excerpt of a body for failure reports."""
    text = body[:limit].decode("utf-8", errors="replace")
    return text + ("…" if len(body) > limit else "")


class Expect(BaseModel):
    """What a response (or delivery, or record) must look like for the step to pass."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: int | list[int] | None = Field(
        default=None,
        description="Wanted status code or list of codes; default: any 2xx (HTTP kinds).",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Header name → regular expression the value must fully match; default: none.",
    )
    json_: Annotated[dict[str, Any], JSON_PATH_KEYS] = Field(
        default_factory=dict,
        alias="json",
        description="JSON path → wanted value (exact, after template rendering); default: none.",
    )
    body: str | None = Field(
        default=None, description="Regular expression the body must contain; default: none."
    )
    json_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema the body must validate against; default: none."
    )
    max_latency: Duration | None = Field(
        default=None, description="Latency budget, e.g. 500ms; default: none."
    )

    @field_validator("headers")
    @classmethod
    def _header_patterns_compile(cls, value: dict[str, str]) -> dict[str, str]:
        for pattern in value.values():
            _compile(pattern)
        return value

    @field_validator("body")
    @classmethod
    def _body_pattern_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            _compile(value)
        return value

    @field_validator("json_schema")
    @classmethod
    def _schema_is_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            jsonschema.validators.validator_for(value).check_schema(value)
        return value


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"bad regular expression {pattern!r}: {exc}") from exc


class ExtractRule(BaseModel):
    """Where to take one value from: a JSON path, a header, or a regex's first group."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    json_: str | None = Field(default=None, alias="json", description="JSON path; default: none.")
    header: str | None = Field(default=None, description="Header name; default: none.")
    regex: str | None = Field(
        default=None,
        description="Regex on the body; its first group (or the match); default: none.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ExtractRule:
        given = [n for n in ("json_", "header", "regex") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, header, regex")
        if self.json_ is not None:
            validate_json_path(self.json_)
        if self.regex is not None:
            _compile(self.regex)
        return self


def rendered_json(expect: Expect, ctx: StepContext) -> dict[str, Any]:
    """`expect.json` with its wanted values rendered (they may name run or step values)."""
    return {path: ctx.render_value(want) for path, want in expect.json_.items()}


def check_status(want: int | list[int] | None, status: int) -> None:
    ok = (
        200 <= status < 300
        if want is None
        else status in ([want] if isinstance(want, int) else want)
    )
    if not ok:
        wanted = "2xx" if want is None else str(want)
        raise HttpStatusError(f"status {status}, want {wanted}")


def check(
    expect: Expect,
    *,
    status: int | None,
    headers: Mapping[str, str],
    body: bytes,
    latency_s: float | None,
    rendered_json: Mapping[str, Any] | None = None,
) -> None:
    """Raise the first assertion that does not hold. `rendered_json` replaces `expect.json_`
    after the caller rendered its templates."""
    if status is not None:
        check_status(expect.status, status)
    for name, pattern in expect.headers.items():
        value = headers.get(name)
        if value is None:
            raise AssertionFailed(f"header {name} missing, want /{pattern}/")
        if _compile(pattern).fullmatch(value) is None:
            raise AssertionFailed(f"header {name} is {value!r}, want /{pattern}/")
    wanted_json = expect.json_ if rendered_json is None else rendered_json
    if wanted_json or expect.json_schema is not None:
        _check_json(expect, wanted_json, body)
    if (
        expect.body is not None
        and _compile(expect.body).search(body.decode("utf-8", "replace")) is None
    ):
        raise AssertionFailed(f"body does not contain /{expect.body}/")
    if expect.max_latency is not None and latency_s is not None and latency_s > expect.max_latency:
        raise AssertionFailed(
            f"latency {latency_s * 1000:.0f}ms, want <= {expect.max_latency * 1000:.0f}ms"
        )


def _check_json(expect: Expect, wanted_json: Mapping[str, Any], body: bytes) -> None:
    doc = parse_json(body)
    if doc is _MISSING:
        raise AssertionFailed("body is not JSON, want JSON")
    for path, want in wanted_json.items():
        found = json_path_get(doc, path)
        if not found:
            raise AssertionFailed(f"{path} missing, want {want!r}")
        if not any(same_value(v, want) for v in found):
            raise AssertionFailed(f"{path} is {found[0]!r}, want {want!r}")
    if expect.json_schema is not None:
        validator = jsonschema.validators.validator_for(expect.json_schema)(expect.json_schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise AssertionFailed(f"body fails JSON Schema at {where}: {error.message}")


def extract(
    rules: Mapping[str, ExtractRule], *, headers: Mapping[str, str], body: bytes
) -> dict[str, Any]:
    """The values named by `rules`, marked Untrusted when they are strings."""
    out: dict[str, Any] = {}
    doc: Any = _MISSING
    for name, rule in rules.items():
        if rule.json_ is not None:
            if doc is _MISSING:
                doc = parse_json(body)
                if doc is _MISSING:
                    raise ExtractFailed(f"{name}: body is not JSON, want {rule.json_}")
            found = json_path_get(doc, rule.json_)
            if not found:
                raise ExtractFailed(f"{name}: {rule.json_} not in body")
            value = found[0]
        elif rule.header is not None:
            header = headers.get(rule.header)
            if header is None:
                raise ExtractFailed(f"{name}: header {rule.header} missing")
            value = header
        else:
            match = _compile(rule.regex or "").search(body.decode("utf-8", "replace"))
            if match is None:
                raise ExtractFailed(f"{name}: /{rule.regex}/ not found in body")
            value = match.group(1) if match.groups() else match.group(0)
        out[name] = Untrusted(value) if isinstance(value, str) else value
    return out
