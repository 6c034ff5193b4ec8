"""One Postman request as an `http` step: method, URL, headers, body (raw JSON or text,
urlencoded, form-data text fields, GraphQL) and auth (basic, bearer, API key)."""

from __future__ import annotations

import json
import re
from typing import Any

from monitor.importers.postman_values import VARIABLE, FlowValues
from monitor.importers.report import ImportResult
from probes import http as http_kind

_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
_BOUNDARY = "hopwatch-form-boundary"
_PLACEHOLDER = re.compile(r"@@hw(\d+)@@")


def request_step(
    request: Any, auth: Any, name: str, refs: FlowValues, result: ImportResult,
    notes: list[str], copied: str,
) -> dict[str, Any] | None:  # fmt: skip
    """The step, or None (reported) when the request cannot be sent by an `http` step."""

    def leave_out(what: str, source: str = "") -> None:
        if not copied:
            notes.append("not translated: " + result.leave_out(refs.where, what, source).line())

    if isinstance(request, str):  # v2 allows a bare URL
        request = {"url": request, "method": "GET"}
    if not isinstance(request, dict):
        leave_out("the request is not an object; step left out")
        return None
    method = str(request.get("method") or "GET").upper()
    if method not in _METHODS:
        leave_out(f"method {method} is not one an http step sends; step left out")
        return None
    step: dict[str, Any] = {"name": name, "kind": http_kind.SPEC.name}
    if method != "GET":
        step["method"] = method
    url = _url(request.get("url")).strip()
    if not url:
        leave_out("the request has no URL; step left out")
        return None
    if "://" not in url and not url.startswith("{{"):
        url = "http://" + url  # as Postman does with a URL without a scheme
    step["url"] = refs.text(url)
    headers = {
        str(h["key"]): refs.text(h.get("value", ""))
        for h in request.get("header") or []
        if isinstance(h, dict) and h.get("key") and not h.get("disabled")
    }
    _auth(auth, step, headers, refs, leave_out)
    _body(request.get("body"), step, headers, refs, leave_out)
    if headers:
        step["headers"] = headers
    behaviour = request.get("protocolProfileBehavior") or {}
    if behaviour.get("followRedirects", True):  # Postman follows redirects unless told not to
        step["follow_redirects"] = True
    return step


def _url(url: Any) -> str:
    if isinstance(url, str):
        return url
    if not isinstance(url, dict):
        return ""
    raw = url.get("raw")
    if raw is None:
        host = url.get("host") or []
        host = ".".join(host) if isinstance(host, list) else str(host)
        path = url.get("path") or []
        path = "/".join(str(p) for p in path) if isinstance(path, list) else str(path)
        scheme = str(url.get("protocol") or "") + "://" if url.get("protocol") else "http://"
        raw = (scheme if "://" not in host else "") + host
        raw += "/" + path if path else ""
        query = [q for q in url.get("query") or [] if not q.get("disabled")]
        if query:
            raw += "?" + "&".join(f"{q.get('key')}={q.get('value') or ''}" for q in query)
    for var in url.get("variable") or []:  # path variables: /users/:id
        if isinstance(var, dict) and var.get("key"):
            raw = re.sub(rf":{re.escape(str(var['key']))}(?=/|\?|#|$)", str(var.get("value")), raw)
    return str(raw)


def _attrs(auth: dict[str, Any], kind: str) -> dict[str, Any]:
    """An auth type's attributes: v2.1's `[{key, value}]` or v2.0's mapping."""
    raw = auth.get(kind)
    if isinstance(raw, list):
        return {str(a.get("key")): a.get("value") for a in raw if isinstance(a, dict)}
    return dict(raw) if isinstance(raw, dict) else {}


def _auth(auth: Any, step: dict[str, Any], headers: dict[str, str], refs: FlowValues,
          leave_out: Any) -> None:  # fmt: skip
    if not isinstance(auth, dict) or auth.get("type") in (None, "noauth", "inherit"):
        return
    kind = str(auth["type"])
    attrs = _attrs(auth, kind)
    if kind == "basic":
        user = refs.text(attrs.get("username", ""))
        step["auth"] = {"basic": {"username": user, "password": _secret(attrs, "password", refs)}}
    elif kind == "bearer":
        step["auth"] = {"bearer": _secret(attrs, "token", refs)}
    elif kind == "apikey":
        key = refs.text(attrs.get("key", "")) or "X-API-Key"
        value = _secret(attrs, "value", refs)
        if attrs.get("in") == "query":
            step["url"] += ("&" if "?" in step["url"] else "?") + f"{key}={value}"
        else:
            headers[key] = value
    else:
        leave_out(f"auth type {kind} is not translated (basic, bearer and apikey are)")


def _secret(attrs: dict[str, Any], key: str, refs: FlowValues) -> str:
    """A credential: a variable becomes an `${env:…}` reference; a literal one too (its
    value is never written to the flow file)."""
    value = str(attrs.get(key) or "")
    refs.result.keep_secret(value)
    if VARIABLE.search(value):
        return refs.text(value, secret=True)
    name = f"auth_{key}_{refs.where}"
    return refs.result.export(
        "POSTMAN_" + re.sub(r"\W+", "_", name).strip("_").upper(),
        f"the {key} written in {refs.where}'s auth",
    )


def _body(body: Any, step: dict[str, Any], headers: dict[str, str], refs: FlowValues,
          leave_out: Any) -> None:  # fmt: skip
    if not isinstance(body, dict) or body.get("disabled"):
        return
    mode = body.get("mode")
    if mode == "raw":
        raw = str(body.get("raw") or "")
        if not raw:
            return
        language = (((body.get("options") or {}).get("raw") or {}).get("language")) or ""
        parsed = _json_template(raw, refs)
        if parsed is not None and (language == "json" or _is_json(headers)):
            step["json"] = parsed
            if language == "json":
                headers.setdefault("Content-Type", "application/json")
        else:
            step["body"] = refs.text(raw)
            if language == "json":
                headers.setdefault("Content-Type", "application/json")
    elif mode == "urlencoded":
        fields = [f for f in body.get("urlencoded") or [] if not f.get("disabled")]
        step["body"] = "&".join(
            refs.text(_quote(f.get("key", "")), urlencode=True) + "="
            + refs.text(_quote(f.get("value", "")), urlencode=True) for f in fields
        )  # fmt: skip
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    elif mode == "formdata":
        _form(body, step, headers, refs, leave_out)
    elif mode == "graphql":
        gql = body.get("graphql") or {}
        variables = gql.get("variables") or "{}"
        try:
            parsed_vars = json.loads(variables) if isinstance(variables, str) else variables
        except ValueError:
            parsed_vars = None
        step["json"] = {"query": refs.text(gql.get("query", "")), "variables": parsed_vars}
    elif mode is not None:
        leave_out(f"body mode {mode} is not translated")


def _quote(text: Any) -> str:
    """URL-encode the literal parts of a form value; its variables are encoded when rendered."""
    from urllib.parse import quote_plus

    parts = VARIABLE.split(str(text))
    return "".join(quote_plus(p) if i % 2 == 0 else "{{" + p + "}}" for i, p in enumerate(parts))


def _form(body: dict[str, Any], step: dict[str, Any], headers: dict[str, str],
          refs: FlowValues, leave_out: Any) -> None:  # fmt: skip
    """Form-data text fields as a multipart body; file fields are listed."""
    parts = []
    for field in body.get("formdata") or []:
        if field.get("disabled"):
            continue
        if field.get("type") == "file":
            leave_out(f"form-data file field {field.get('key')!r} is not translated")
            continue
        key, value = refs.text(field.get("key", "")), refs.text(field.get("value", ""))
        parts.append(
            f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'
        )
    step["body"] = "".join(parts) + f"--{_BOUNDARY}--\r\n"
    headers["Content-Type"] = f"multipart/form-data; boundary={_BOUNDARY}"


def _is_json(headers: dict[str, str]) -> bool:
    return any(k.lower() == "content-type" and "json" in v.lower() for k, v in headers.items())


def _json_template(raw: str, refs: FlowValues) -> Any:
    """A raw JSON body as a value whose strings carry the templates, or None when the
    variables stand outside strings (then the body is sent as text)."""
    found: list[str] = []

    def hold(match: re.Match[str]) -> str:
        found.append(match.group(0))
        return f"@@hw{len(found) - 1}@@"

    try:
        value = json.loads(VARIABLE.sub(hold, raw))
    except ValueError:
        return None

    def put(node: Any) -> Any:
        if isinstance(node, str):
            return refs.text(_PLACEHOLDER.sub(lambda m: found[int(m.group(1))], node))
        if isinstance(node, list):
            return [put(v) for v in node]
        if isinstance(node, dict):
            return {put(k): put(v) for k, v in node.items()}
        return node

    return put(value)
