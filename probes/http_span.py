"""The span of an HTTP step by OpenTelemetry's conventions: CLIENT, named for its method, with
the URL the run really asked for, credentials and signing keys redacted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from yarl import URL

from probes.base import StepContext
from probes.http_common import RequestConfig
from probes.kinds import SpanShape

_SENSITIVE_QUERY: Final = frozenset({"AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature"})


def redact_url(url: str, redact: Callable[[str], str] | None = None) -> str:
    """url.full as the conventions want it: no credentials, no signing keys, no known secrets."""
    try:
        parsed = URL(url)
    except ValueError:
        return "REDACTED"
    if parsed.user is not None or parsed.password is not None:
        parsed = parsed.with_user("REDACTED").with_password("REDACTED")
    if any(k in _SENSITIVE_QUERY for k in parsed.query):
        parsed = parsed.with_query(
            [(k, "REDACTED" if k in _SENSITIVE_QUERY else v) for k, v in parsed.query.items()]
        )
    text = str(parsed)
    return str(redact(text)) if redact is not None else text


def http_span(config: RequestConfig, ctx: StepContext) -> SpanShape:
    """`{method}`, kind CLIENT, with `http.request.method` and the URL's attributes."""
    attrs: dict[str, Any] = {"http.request.method": config.method}
    attrs.update(_url_attributes(config, ctx))
    return SpanShape(config.method, "client", attrs)


def _url_attributes(config: RequestConfig, ctx: StepContext) -> dict[str, Any]:
    """url.full, server.address and server.port of an HTTP step, rendered for this run."""
    try:
        url = URL(ctx.render(config.url, "url"))
        query = {k: ctx.render(v) for k, v in (config.query or {}).items()}
    except Exception:  # the probe reports template trouble; the span just lacks the URL
        return {}
    if query:
        url = url.extend_query(query)
    attrs: dict[str, Any] = {"url.full": redact_url(str(url), ctx.renderer.redact)}
    if url.host:
        attrs["server.address"] = url.host
    if url.port is not None:
        attrs["server.port"] = url.port
    return attrs
