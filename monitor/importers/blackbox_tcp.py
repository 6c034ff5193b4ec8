"""A blackbox_exporter `tcp` module as one `tcp` step: TLS from the start or by `starttls`, and
its `query_response` conversation as the step's own.

blackbox writes each `send` followed by a newline, and expands Go's `$1`, `${1}`, `$name`,
`${name}` (`$$` a literal `$`) in a `send` that follows an `expect` in the same entry from that
expect's match; the step adds the newline and writes each reference as its own `${…}` (a group
the expect lacks is empty in Go, so it is left out here too).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from monitor.importers.blackbox_step import (
    ModuleStep,
    ip_protocol,
    short,
    tls_settings,
    validation_message,
)
from monitor.importers.report import ImportResult
from probes import tcp as tcp_kind

_HANDLED = {"query_response", "tls", "tls_config", "preferred_ip_protocol",
            "ip_protocol_fallback"}  # fmt: skip
_ENTRY = {"expect", "send", "starttls", "labels"}


class _Untranslatable(Exception):
    """An entry of the conversation the step cannot hold, and why."""


def tcp_step(
    module: str, tcp: dict[str, Any], targets: list[str], result: ImportResult
) -> tuple[dict[str, Any], list[str]]:
    """The step for a module's `tcp` section, and its comment lines."""
    s = ModuleStep(module, tcp_kind.SPEC.name, {"address": "{{ variant.target }}"}, targets,
                   result)  # fmt: skip
    s.unknown_options(tcp, _HANDLED)
    s.check_targets("HOST:PORT", tcp_kind.split_address)
    moves = _conversation(s, tcp.get("query_response") or [])
    starttls = any(move.get("starttls") for move in moves)
    # blackbox reads tls_config only for a TLS connection: from the start or at starttls.
    if tcp.get("tls") or starttls:
        tls = tls_settings(s, tcp.get("tls_config") or {}, server_name=True)
        if tcp.get("tls") or tls:  # a starttls step upgrades with the defaults otherwise
            s.step["tls"] = tls
    if tcp.get("tls") and starttls:
        s.leave_out("tls: true with a starttls entry is not translated: the step starts plain "
                    "and upgrades at starttls")  # fmt: skip
    if moves:
        s.step["query_response"] = moves
    ip_protocol(s, tcp)
    return s.step, s.notes


def _conversation(s: ModuleStep, entries: Any) -> list[dict[str, Any]]:
    """The entries as the step's moves, up to the first one it cannot hold."""
    moves: list[dict[str, Any]] = []
    if not isinstance(entries, list):
        s.leave_out("query_response is not a list", short(entries))
        return moves
    for number, entry in enumerate(entries, start=1):
        try:
            more = _moves(entry)
            if {"starttls": True} in moves and {"starttls": True} in more:
                raise _Untranslatable("a second starttls (the step upgrades once)")
            moves += more
        except _Untranslatable as exc:
            rest = len(entries) - number
            also = f" (and the {rest} after it)" if rest else ""
            s.leave_out(f"query_response entry {number}{also} is not translated: {exc}; the "
                        "conversation stops before it", short(entry))  # fmt: skip
            break
        if entry.get("labels"):
            s.leave_out(f"query_response entry {number}: labels are not translated (hopwatch "
                        "exports no labels taken from answers)",
                        short(entry["labels"]))  # fmt: skip
    return moves


_GO_REF = re.compile(r"\$(?:(\$)|\{(\w+)\}|(\w+))")  # Go's regexp.Expand template
_GROUP = re.compile(r"\$\{\w+\}")  # what the step reads as a group (escaped by a leading $)


def _expanded(text: str, expect: re.Pattern[str]) -> str:
    """A Go `Expand` template as the step's send: references as `${…}`, literal text with any
    `${…}` of its own escaped."""
    out: list[str] = []
    literal: list[str] = []

    def flush() -> None:
        out.append(_GROUP.sub(r"$\g<0>", "".join(literal)))
        literal.clear()

    at = 0
    for ref in _GO_REF.finditer(text):
        literal.append(text[at : ref.start()])
        at = ref.end()
        if ref.group(1):
            literal.append("$")
            continue
        name = ref.group(2) or ref.group(3)
        known = int(name) <= expect.groups if name.isdigit() else name in expect.groupindex
        if not known:
            continue  # Go expands a group the regex lacks to nothing
        flush()
        if out[-1].endswith("$"):
            raise _Untranslatable("a literal $ right before a group (the step reads $${…} as "
                                  "an escaped ${…})")  # fmt: skip
        out.append("${" + name + "}")
    literal.append(text[at:])
    flush()
    return "".join(out)


def _moves(entry: Any) -> list[dict[str, Any]]:
    """One blackbox entry (expect, then send, then starttls) as the step's moves."""
    if not isinstance(entry, dict):
        raise _Untranslatable("not a mapping")
    unknown = sorted(set(entry) - _ENTRY)
    if unknown:
        raise _Untranslatable(f"{', '.join(unknown)} has no equivalent")
    moves: list[dict[str, Any]] = []
    expect = entry.get("expect")
    if expect:
        try:
            tcp_kind.Exchange(expect=str(expect))
        except ValidationError as exc:
            raise _Untranslatable(validation_message(exc)) from None
        moves.append({"expect": str(expect)})
    send = entry.get("send")
    if isinstance(send, bytes):
        raise _Untranslatable("send of binary data (the step sends text)")
    if send not in (None, ""):
        text = str(send)
        if "{{" in text:
            raise _Untranslatable("send holds {{, which the step would read as a template")
        if expect:
            text = _expanded(text, re.compile(str(expect)))
        elif tcp_kind.group_refs(text):  # blackbox sends it as is: so must the step
            text = _GROUP.sub(r"$\g<0>", text)
        moves.append({"send": text + "\n"})
    if entry.get("starttls"):
        moves.append({"starttls": True})
    return moves
