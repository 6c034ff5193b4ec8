"""Postman `{{variables}}` as hopwatch template text: a value set by an earlier step becomes
`{{ steps.<step>.<name> }}`, a collection or environment value a variant value, a secret an
`${env:…}` reference (its value never written), a dynamic variable (`{{$guid}}`) a run value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from monitor.importers.report import ImportResult, env_name, identifier

VARIABLE = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
_SECRET_NAME = re.compile(
    r"pass(word|wd)?|secret|token|api[-_]?key|apikey|credential|private|session|auth", re.I
)
# Postman's dynamic variables with a run value that means the same; `$random…` values that
# only need to be unique get the run's id.
_DYNAMIC = {
    "$guid": "{{ run.guid }}", "$randomUUID": "{{ run.guid }}",
    "$timestamp": "{{ run.timestamp }}", "$isoTimestamp": "{{ run.iso_timestamp }}",
    "$randomInt": "{{ range(0, 1001) | random }}",
    "$randomEmail": "hw-{{ run.id }}@example.com",
    "$randomUserName": "hw-{{ run.id }}", "$randomAlphaNumeric": "{{ run.id[0] }}",
}  # fmt: skip
ENV_PREFIX = "POSTMAN"


@dataclass(slots=True)
class Values:
    """Every variable the collection and environment define, and which are secret."""

    static: dict[str, Any] = field(default_factory=dict)
    secret: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, collection: dict[str, Any], environment: dict[str, Any] | None) -> Values:
        values = cls()
        for var in collection.get("variable") or []:
            if isinstance(var, dict) and "key" in var and not var.get("disabled"):
                values.add(str(var["key"]), var.get("value"), var.get("type") == "secret")
        for var in (environment or {}).get("values") or []:
            if isinstance(var, dict) and "key" in var and var.get("enabled", True):
                values.add(str(var["key"]), var.get("value"), var.get("type") == "secret")
        return values

    def add(self, name: str, value: Any, secret: bool) -> None:
        self.static[name] = "" if value is None else value
        if secret or _SECRET_NAME.search(name):
            self.secret.add(name)


@dataclass(slots=True)
class FlowValues:
    """Variable references inside one flow: what earlier steps set, and the variant's values."""

    values: Values
    result: ImportResult
    where: str = ""
    set_by: dict[str, str] = field(default_factory=dict)  # variable → step that sets it
    variant: dict[str, Any] = field(default_factory=dict)

    def ref(self, name: str, *, secret: bool = False, urlencode: bool = False) -> str:
        """The template text that stands for `{{name}}` in this flow, at this point."""
        if name.startswith("$"):
            return self._dynamic(name)
        step = self.set_by.get(name)
        if step is not None:
            text = f"steps.{step}.{identifier(name)}"
        elif secret or name in self.values.secret:
            why = "secret" if name in self.values.static else "not defined in the collection"
            return self.result.export(env_name(ENV_PREFIX, name), f"Postman {{{{{name}}}}}, {why}")
        elif name in self.values.static:
            value = self.values.static[name]
            if isinstance(value, str) and "{{" in value:  # Postman resolves nested variables
                return self.text(value, secret=secret)
            self.variant[identifier(name)] = value
            text = f"variant.{identifier(name)}"
        else:
            return self.result.export(
                env_name(ENV_PREFIX, name),
                f"Postman {{{{{name}}}}}, not defined in the collection or environment",
            )
        return "{{ " + text + (" | urlencode" if urlencode else "") + " }}"

    def _dynamic(self, name: str) -> str:
        if name in _DYNAMIC:
            return _DYNAMIC[name]
        self.result.leave_out(
            self.where, f"dynamic variable {{{{{name}}}}} has no run value; the run id stands in"
        )
        return "{{ run.id }}"

    def text(self, text: Any, *, secret: bool = False, urlencode: bool = False) -> str:
        """A Postman string with every `{{variable}}` replaced."""
        return VARIABLE.sub(
            lambda m: self.ref(m.group(1), secret=secret, urlencode=urlencode), str(text)
        )
