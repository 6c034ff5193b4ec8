"""A blackbox_exporter `dns` module as one `dns` step: the question, the transport, the wanted
response codes, and `validate_answer_rrs` as a regex every answer record must match.

blackbox matches its regexes against each record as miekg/dns prints it, fields separated by
tabs (`www.example.org.\t300\tIN\tA\t192.0.2.1`); the step's records are dnspython's, separated
by spaces, so a tab in a regex (outside a character class) is read as either. blackbox also
validates the CNAMEs on the way, the step only the records of the asked type.
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import ValidationError

from monitor.importers.blackbox_step import ModuleStep, ip_protocol, short, validation_message
from monitor.importers.report import ImportResult
from probes import dns as dns_kind

_HANDLED = {"query_name", "query_type", "query_class", "valid_rcodes", "validate_answer_rrs",
            "validate_authority_rrs", "validate_additional_rrs", "transport_protocol",
            "recursion_desired", "dns_over_tls", "preferred_ip_protocol",
            "ip_protocol_fallback"}  # fmt: skip
# blackbox's transport_protocol values are the step's `transport` values (udp, tcp).
_TRANSPORT = dns_kind.Config.model_fields["transport"]
_TRANSPORTS = get_args(_TRANSPORT.annotation)
_DEFAULT_TYPE = "ANY"  # blackbox's, where the step's is A
_ANY = r"[\s\S]*"
# Each regex list as a lookahead: together they say what every record must be.
_EVERY_RECORD = {"fail_if_matches_regexp": "(?!{any}(?:{re}))",
                 "fail_if_not_matches_regexp": "(?={any}(?:{re}))"}  # fmt: skip
_SET_RULES = {
    "fail_if_all_match_regexp": "it fails when every record matches",
    "fail_if_none_matches_regexp": "it fails when no record matches",
}


def dns_step(
    module: str, dns: dict[str, Any], targets: list[str], result: ImportResult
) -> tuple[dict[str, Any], list[str]] | None:
    """The step for a module's `dns` section and its comment lines; None when the question
    itself cannot be asked (listed)."""
    s = ModuleStep(module, dns_kind.SPEC.name, {"server": "{{ variant.target }}"}, targets,
                   result)  # fmt: skip
    question = _question(s, dns)
    if question is None:
        return None
    s.step |= question
    s.unknown_options(dns, _HANDLED)
    s.check_targets("HOST or HOST:PORT of a name server", dns_kind.split_server)
    transport = str(dns.get("transport_protocol") or _TRANSPORT.default)
    if transport not in _TRANSPORTS:
        s.leave_out(f"transport_protocol {transport} is not translated: the step asks over "
                    f"{_TRANSPORT.default}")  # fmt: skip
    elif transport != _TRANSPORT.default:
        s.step["transport"] = transport
    if dns.get("recursion_desired") is False:
        s.step["recursion"] = False
    expect = _rcodes(s, dns.get("valid_rcodes"))
    answers_match = _answer_rules(s, dns.get("validate_answer_rrs"))
    if answers_match:
        expect["answers_match"] = answers_match
    if expect:
        s.step["expect"] = expect
    for section in ("validate_authority_rrs", "validate_additional_rrs"):
        if dns.get(section):
            s.leave_out(f"{section} is not translated (the step checks the answer section)",
                        short(dns[section]))  # fmt: skip
    ip_protocol(s, dns)
    return s.step, s.notes


def _question(s: ModuleStep, dns: dict[str, Any]) -> dict[str, Any] | None:
    """query_name and query_type, or None (listed) when the step cannot ask the same question."""
    name, rdtype = dns.get("query_name"), str(dns.get("query_type") or _DEFAULT_TYPE)
    rdclass = str(dns.get("query_class") or "IN").upper()
    problem = None
    if not name:
        problem = "no query_name (blackbox refuses the module too)"
    elif rdclass != "IN":
        problem = f"query_class {rdclass} (the step asks class IN)"
    elif dns.get("dns_over_tls"):
        problem = "dns_over_tls (the step asks over plain udp or tcp)"
    else:
        try:
            dns_kind.Config(kind=dns_kind.SPEC.name, name="probe", query_name=str(name),
                            query_type=rdtype)  # fmt: skip
        except ValidationError as exc:
            problem = validation_message(exc)
    if problem is not None:
        s.leave_out(f"{problem} is not translated: no flow made")
        return None
    question: dict[str, Any] = {"query_name": str(name)}
    if rdtype.upper() != "A":
        question["query_type"] = rdtype.upper()
    return question


def _rcodes(s: ModuleStep, rcodes: Any) -> dict[str, Any]:
    if not rcodes:
        return {}  # blackbox's default and the step's: NOERROR
    wanted = [str(code) for code in (rcodes if isinstance(rcodes, list) else [rcodes])]
    try:
        dns_kind.DnsExpect(rcode=wanted)
    except ValidationError as exc:
        why = validation_message(exc)
        s.leave_out(f"valid_rcodes is not translated ({why}): NOERROR is wanted", wanted)
        return {}
    return {} if wanted == ["NOERROR"] else {"rcode": wanted}


def _answer_rules(s: ModuleStep, rules: Any) -> str | None:
    """The rules on every record as one regex the step's `answers_match` can hold."""
    if not rules:
        return None
    if not isinstance(rules, dict):
        s.leave_out("validate_answer_rrs is not a mapping", short(rules))
        return None
    parts: list[str] = []
    for key, patterns in rules.items():
        if key in _SET_RULES:
            s.leave_out(f"validate_answer_rrs.{key} is not translated ({_SET_RULES[key]}; the "
                        "step checks each record alone)", short(patterns))  # fmt: skip
            continue
        if key not in _EVERY_RECORD:
            s.leave_out(f"validate_answer_rrs.{key} is not translated", short(patterns))
            continue
        for pattern in patterns or []:
            part = _EVERY_RECORD[key].format(any=_ANY, re=tabs_as_spaces(str(pattern)))
            try:
                dns_kind.DnsExpect(answers_match=part)
            except ValidationError as exc:
                why = validation_message(exc)
                s.leave_out(f"validate_answer_rrs.{key} {why} is not translated", str(pattern))
                continue
            parts.append(part)
    return "^" + "".join(parts) if parts else None


def tabs_as_spaces(pattern: str) -> str:
    """`pattern` with each tab outside a character class (written as a tab or as `\\t`)
    matching a tab or a space, as the step's records separate their fields by spaces."""
    out: list[str] = []
    in_class, i = False, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            pair = pattern[i : i + 2]
            out.append("[\\t ]" if pair == "\\t" and not in_class else pair)
            i += 2
            continue
        if char == "[" and not in_class:
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        out.append("[\\t ]" if char == "\t" and not in_class else char)
        i += 1
    return "".join(out)
