"""What every blackbox module's step shares, whatever its prober: the step being built with the
notes of what it leaves out, and the TLS and IP-protocol options all probers have."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

from monitor.importers.report import ImportResult, env_name

PLACEHOLDER = "TARGET"  # the target of a module no scrape job names
_TLS_KEYS = ("insecure_skip_verify", "ca_file", "cert_file", "key_file")
_IP_OPTIONS = "preferred_ip_protocol/ip_protocol_fallback are not translated (hopwatch tries " \
              "every address the resolver gives)"  # fmt: skip


class ModuleStep:
    """The step being built for one module, and the notes for what it leaves out."""

    def __init__(
        self, module: str, kind: str, fields: dict[str, Any], targets: list[str],
        result: ImportResult,
    ) -> None:  # fmt: skip
        self.module = module
        self.targets = targets
        self.result = result
        self.notes: list[str] = []
        self.step: dict[str, Any] = {"name": "probe", "kind": kind, **fields}

    def leave_out(self, what: str, source: Any = "") -> None:
        text = f"{source}" if source != "" else ""
        item = self.result.leave_out(f"module '{self.module}'", what, text)
        self.notes.append("not translated: " + item.line())

    def secret(self, what: str) -> str:
        """An `${env:…}` reference standing for a credential (its value is never written)."""
        name = env_name("BLACKBOX", f"{self.module}_{what}")
        return self.result.export(name, f"{what} of blackbox module {self.module!r}")

    def unknown_options(self, section: dict[str, Any], handled: Iterable[str]) -> None:
        known = set(handled)
        for key in section:
            if key not in known:
                self.leave_out(f"option {key} is not translated", short(section[key]))

    def check_targets(self, want: str, fits: Callable[[str], object]) -> None:
        """List each scrape target the step cannot use as it is (`fits` raises ValueError)."""
        for target in self.targets:
            if target == PLACEHOLDER:
                continue
            try:
                fits(target)
            except ValueError:
                self.leave_out(f"target {target!r} is not {want}: its variant cannot run as is")


def short(value: Any) -> str:
    """An option's value to show: a mapping by its keys only (it may hold a client secret),
    a URL without its user info."""
    if isinstance(value, dict):
        return "{" + ", ".join(str(k) for k in value) + "}"
    text = re.sub(r"//[^/@\s]+@", "//***@", str(value))
    return text if len(text) < 80 else text[:77] + "…"


def tls_settings(
    s: ModuleStep, tls: dict[str, Any], *, server_name: bool, skip_verify: bool = True
) -> dict[str, Any]:
    """blackbox's `tls_config` as a step's `tls` (the keys hopwatch has); `server_name` goes to
    the step's own field when the kind has one; the rest is listed."""
    out: dict[str, Any] = {}
    if tls.get("insecure_skip_verify"):
        if skip_verify:
            out["verify"] = False
        else:
            s.leave_out("tls_config.insecure_skip_verify is not translated (this kind always "
                        "verifies the certificate)")  # fmt: skip
    for key in _TLS_KEYS[1:]:
        if tls.get(key):
            out[key] = str(tls[key])
    for key in tls:
        if key == "server_name" and server_name and tls[key]:
            s.step["server_name"] = str(tls[key])
        elif key not in _TLS_KEYS:
            s.leave_out(f"tls_config.{key} is not translated", short(tls[key]))
    return out


def ip_protocol(s: ModuleStep, section: dict[str, Any]) -> None:
    """blackbox's address-family preference: listed unless it is blackbox's default (ip6 with
    a fallback), which is what trying every address amounts to."""
    if str(section.get("preferred_ip_protocol", "ip6")) != "ip6" or (
        section.get("ip_protocol_fallback") is False
    ):
        s.leave_out(_IP_OPTIONS, section.get("preferred_ip_protocol", ""))


def validation_message(exc: ValidationError) -> str:
    """The first problem pydantic found, as a kind's validator worded it."""
    return str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
