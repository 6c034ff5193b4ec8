"""Jinja2 sandbox rendering for flow files, with secret references and untrusted-value handling.

`${env:NAME}` and `${file:/path}` are secret references: resolved at render time, never stored in
the config, and every resolved value is remembered by the Redactor so it never reaches a log, a
metric, an error or `--output json`. Values taken from responses (`Untrusted`) are URL-encoded in
URLs (refused when they are a dot segment, `.` or `..`, which URL-encoding leaves alone and the
HTTP client would resolve, climbing the path) and refused in headers when they carry CR or LF.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from probes.base import RenderMode, Untrusted
from probes.errors import ExtractFailed, TemplateError
from probes.secrets import SecretUnavailable, resolve_secret, resolved_secrets


class Redactor:
    """Remembers secret values and masks them in any text that leaves the monitor."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._sorted: list[str] = []
        self._sizes = (0, 0)  # both sets only grow: their sizes tell when _sorted is stale

    def add(self, secret: str) -> None:
        if len(secret) >= 4:  # masking very short strings would mangle ordinary text
            self._secrets.add(secret)

    def __call__(self, text: str | None) -> str | None:
        """`text` with every secret this redactor saw, and every one resolved anywhere in the
        process (`probes.secrets.resolved_secrets`), masked; longest first, so a secret that
        contains another is masked whole."""
        if not text:
            return text
        for secret in self._all():
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def _all(self) -> list[str]:
        shared = resolved_secrets()
        if self._sizes != (len(self._secrets), len(shared)):
            self._sorted = sorted(self._secrets | shared, key=len, reverse=True)
            self._sizes = (len(self._secrets), len(shared))
        return self._sorted


def resolve_secret_refs(text: str, redactor: Redactor | None = None) -> str:
    """Replace secret references by their values, remembering each value for redaction."""
    try:
        return resolve_secret(text, redactor.add if redactor is not None else None)
    except SecretUnavailable as exc:
        raise TemplateError(str(exc)) from exc


_DOT_SEGMENTS = frozenset({".", ".."})


def _url_value(value: Any) -> Any:
    if not isinstance(value, Untrusted):
        return value
    if value in _DOT_SEGMENTS:  # yarl removes dot segments, even written %2E%2E
        raise ExtractFailed(f"value {value!r} is a dot segment; refused in a URL")
    return quote(value, safe="")


def _header_value(value: Any) -> Any:
    if isinstance(value, Untrusted) and ("\r" in value or "\n" in value):
        raise ExtractFailed(f"value {value[:40]!r} carries CR/LF; refused in a header")
    return value


def _as_is(value: Any) -> Any:
    return value


_FINALIZERS: dict[str, Any] = {"url": _url_value, "header": _header_value}


def _finalizer(mode: RenderMode) -> Any:
    """What a rendered value goes through in `mode`: made once, looked up per render."""
    return _FINALIZERS.get(mode, _as_is)


_UNSET = object()
_SIMPLE = re.compile(r"\{\{\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*\}\}")


def _simple_parts(template: str) -> list[str | tuple[str, ...]] | None:
    """Literal text and `{{ dotted.name }}` parts, or None when the template needs Jinja
    (filters, tests, statements): most flow templates are simple, and Jinja costs ~10 µs."""
    parts: list[str | tuple[str, ...]] = []
    at = 0
    for match in _SIMPLE.finditer(template):
        parts.append(template[at : match.start()])
        parts.append(tuple(match.group(1).split(".")))
        at = match.end()
    parts.append(template[at:])
    literal = "".join(p for p in parts if isinstance(p, str))
    return None if "{{" in literal or "{%" in literal or "{#" in literal else parts


_MAPPINGS: Final = (dict, Mapping)  # dict first: a C check


def _render_one(
    names: tuple[str, ...], variables: Mapping[str, Any], mode: RenderMode
) -> str | None:
    """`_render_simple` of a template that is one `{{ dotted.name }}` and nothing else (most
    match rules' values): no parts to walk, no join."""
    value: Any = variables
    for name in names:
        if not isinstance(value, _MAPPINGS):  # as _render_simple reads them
            return None
        try:
            value = value[name]
        except KeyError:
            return None
    if type(value) is not str and isinstance(value, Mapping | list):
        return None
    return str(_FINALIZERS.get(mode, _as_is)(value))


def _render_simple(
    parts: list[str | tuple[str, ...]], variables: Mapping[str, Any], mode: RenderMode
) -> str | None:
    """Render like Jinja would (mapping keys, str() of the value, the mode's finalizer), or
    None to let Jinja render it and word any error (an unknown name, a non-mapping)."""
    finalize = _FINALIZERS.get(mode, _as_is)  # _finalizer(mode), without the call
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value: Any = variables
        for name in part:
            # dicts (and their subclasses, `run`'s RunValues) first: the ABC's isinstance
            # costs more than the look-up; a look-up, not `in` and a look-up: RunValues makes
            # its lazy values on a miss, and its `in` is Python
            if not isinstance(value, (dict, Mapping)):  # dict first: a C check
                return None
            try:
                value = value[name]
            except KeyError:
                return None
        if type(value) is not str and isinstance(value, Mapping | list):
            return None  # Jinja's repr of containers: leave it to Jinja
        out.append(str(finalize(value)))
    return "".join(out)


class _Environment(ImmutableSandboxedEnvironment):
    """Dotted names on mappings mean keys first: `steps.get.id` is step "get", not dict.get."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                pass
        return super().getattr(obj, attribute)


class Templates:
    """Compiles each distinct template once and renders it in a mode (text, url, header)."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        self.redactor = redactor or Redactor()
        self._envs = {
            mode: _Environment(
                undefined=StrictUndefined, finalize=_finalizer(mode), autoescape=False
            )
            for mode in ("text", "url", "header")
        }
        self._cache: dict[tuple[str, str], Any] = {}
        self._simple: dict[str, Any] = {}
        # templates without secret references that are one `{{ dotted.name }}` and nothing
        # else → the name's parts: rendered by `_render_one` before any other test
        self._one: dict[str, tuple[str, ...]] = {}

    def _fast(self, template: str) -> list[str | tuple[str, ...]] | None:
        parts = self._simple.get(template, _UNSET)
        if parts is _UNSET:
            parts = self._simple[template] = _simple_parts(template)
        return parts  # type: ignore[no-any-return]

    def check(self, template: str) -> None:
        """Raise TemplateError if `template` does not compile (for `hopwatch validate`)."""
        self._compiled(template, "text")

    def _compiled(self, template: str, mode: str) -> Any:
        key = (template, mode)
        compiled = self._cache.get(key)
        if compiled is None:
            try:
                compiled = self._envs[mode].from_string(template)
            except TemplateSyntaxError as exc:
                raise TemplateError(f"template {template!r}: {exc.message}") from exc
            self._cache[key] = compiled
        return compiled

    def redact(self, text: str) -> str:
        """`text` with every secret this renderer resolved masked."""
        return self.redactor(text) or ""

    def render(self, template: str, variables: Mapping[str, Any], mode: RenderMode) -> str:
        one = self._one.get(template)
        if one is not None:
            rendered = _render_one(one, variables, mode)
            if rendered is not None:
                return rendered
        if "{" not in template:  # the common case: a literal, nothing to render
            return template
        secrets = "${" in template
        if secrets:
            template = resolve_secret_refs(template, self.redactor)
        if "{{" not in template and "{%" not in template:
            return template
        fast = self._fast(template)
        if fast is not None:
            if not secrets and len(fast) == 3 and fast[0] == fast[2] == "":
                self._one[template] = fast[1]  # type: ignore[assignment]  # parts[1] is a name
            rendered = _render_simple(fast, variables, mode)
            if rendered is not None:
                return rendered
        try:
            return str(self._compiled(template, mode).render(variables))
        except UndefinedError as exc:
            raise TemplateError(f"template {template!r}: {exc.message}") from exc
        except SecurityError as exc:
            raise TemplateError(f"template {template!r}: {exc}") from exc
