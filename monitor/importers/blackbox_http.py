"""A blackbox_exporter `http` module as one `http` step: method, headers, body, auth, TLS,
redirects, and its `valid_status_codes` / `fail_if_*` options as assertions.

blackbox's regular expressions are Go's (RE2); the common ones read the same in Python.
Its header and body checks search (a match anywhere), so they are wrapped to match whole
values where hopwatch matches whole header values.
"""

from __future__ import annotations

import re
from typing import Any

from monitor.importers.blackbox_step import ModuleStep, ip_protocol, tls_settings
from monitor.importers.postman_checks import Checks
from monitor.importers.report import ImportResult
from probes import http as http_kind

_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
_SECRET_HEADER = re.compile(r"authorization|api[-_]?key|token|secret|cookie", re.I)
_ANY = r"[\s\S]*"
# Options with nothing to do in an http step, or whose default is what hopwatch does.
_HANDLED = {
    "valid_status_codes", "method", "headers", "http_headers", "body", "body_file",
    "fail_if_body_matches_regexp", "fail_if_body_not_matches_regexp",
    "fail_if_header_matches", "fail_if_header_not_matches", "tls_config", "basic_auth",
    "bearer_token", "bearer_token_file", "authorization", "follow_redirects",
    "valid_http_versions", "fail_if_ssl", "fail_if_not_ssl", "preferred_ip_protocol",
    "ip_protocol_fallback",
}  # fmt: skip


class _Step(ModuleStep):
    """An http module's step, with the headers and checks it gathers."""

    def __init__(self, module: str, targets: list[str], result: ImportResult) -> None:
        fields = {"url": "{{ variant.target }}"}
        super().__init__(module, http_kind.SPEC.name, fields, targets, result)
        self.headers: dict[str, str] = {}
        self.checks = Checks()


def http_step(
    module: str, http: dict[str, Any], targets: list[str], result: ImportResult
) -> tuple[dict[str, Any], list[str]]:
    """The step for a module's `http` section, and its comment lines."""
    s = _Step(module, targets, result)
    _request(s, http)
    _auth(s, http)
    s.unknown_options(http, _HANDLED)
    tls = tls_settings(s, http.get("tls_config") or {}, server_name=False)
    if tls:
        s.step["tls"] = tls
    _assertions(s, http)
    _transport(s, http)
    if s.headers:
        s.step["headers"] = s.headers
    expect = s.checks.expect()
    if expect:
        s.step["expect"] = expect
    return s.step, s.notes


def _request(s: _Step, http: dict[str, Any]) -> None:
    method = str(http.get("method") or "GET").upper()
    if method in _METHODS:
        if method != "GET":
            s.step["method"] = method
    else:
        s.leave_out(f"method {method} is not one an http step sends; GET is sent")
    for name, value in (http.get("headers") or {}).items():
        value = str(value)
        s.headers[str(name)] = s.secret(f"header_{name}") if _SECRET_HEADER.search(
            str(name)) else value  # fmt: skip
    for name, spec in (http.get("http_headers") or {}).items():
        values = [str(v) for v in (spec or {}).get("values") or []]
        values += [s.secret(f"header_{name}") for _ in (spec or {}).get("secrets") or []][:1]
        values += ["${file:" + str(f) + "}" for f in (spec or {}).get("files") or []]
        if values:
            s.headers[str(name)] = ", ".join(values)
    if http.get("body") is not None:
        s.step["body"] = str(http["body"])
    elif http.get("body_file"):
        s.step["body"] = "${file:" + str(http["body_file"]) + "}"
    s.step["follow_redirects"] = bool(http.get("follow_redirects", True))


def _auth(s: _Step, http: dict[str, Any]) -> None:
    basic = http.get("basic_auth")
    if isinstance(basic, dict):
        if basic.get("password_file"):
            password = "${file:" + str(basic["password_file"]) + "}"
        else:
            s.result.keep_secret(basic.get("password"))
            password = s.secret("password")
        s.step["auth"] = {"basic": {"username": str(basic.get("username", "")),
                                    "password": password}}  # fmt: skip
    authorization = http.get("authorization") or {}
    token_file = http.get("bearer_token_file") or authorization.get("credentials_file")
    if str(authorization.get("type", "Bearer")).lower() != "bearer":
        s.leave_out(f"authorization type {authorization['type']} is not translated")
    elif token_file:
        s.step["auth"] = {"bearer": "${file:" + str(token_file) + "}"}
    elif http.get("bearer_token") or authorization.get("credentials"):
        s.result.keep_secret(http.get("bearer_token") or authorization.get("credentials"))
        s.step["auth"] = {"bearer": s.secret("bearer_token")}


def _assertions(s: _Step, http: dict[str, Any]) -> None:
    codes = http.get("valid_status_codes") or []
    if codes:
        s.checks.want_status([int(c) for c in codes])
    for pattern in http.get("fail_if_body_matches_regexp") or []:
        s.checks.body.append((str(pattern), False))
    for pattern in http.get("fail_if_body_not_matches_regexp") or []:
        s.checks.body.append((str(pattern), True))
    # Go's MatchString finds a match anywhere; hopwatch matches whole header values.
    for key, template in (
        ("fail_if_header_not_matches", _ANY + "(?:{})" + _ANY),
        ("fail_if_header_matches", "(?!" + _ANY + "(?:{}))" + _ANY),
    ):
        for rule in http.get(key) or []:
            header, regexp = (rule or {}).get("header"), (rule or {}).get("regexp", "")
            if not header or rule.get("allow_missing"):
                why = "with allow_missing (a header that may be absent)" if header else "no header"
                s.leave_out(f"{key} on {header} {why} is not translated", regexp)
                continue
            s.checks.want_header(str(header), template.replace("{}", str(regexp)))


def _transport(s: _Step, http: dict[str, Any]) -> None:
    """Options about how the probe connects: kept when hopwatch does the same anyway."""
    versions = http.get("valid_http_versions") or []
    if versions and "HTTP/1.1" not in versions:
        s.leave_out("valid_http_versions without HTTP/1.1 (hopwatch speaks HTTP/1.1)", versions)
    secure = {t.startswith("https://") for t in s.targets}
    redirects = s.step["follow_redirects"]
    for key, want_tls in (("fail_if_ssl", False), ("fail_if_not_ssl", True)):
        # Without redirects the target's scheme decides it; after them it cannot be checked.
        if http.get(key) and (redirects or secure - {want_tls} or not s.targets):
            s.leave_out(f"{key}: true is not checked (the final connection's TLS is not "
                        "asserted)")  # fmt: skip
    ip_protocol(s, http)
