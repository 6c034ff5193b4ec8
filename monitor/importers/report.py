"""What an import produced: flows, what it could not translate and what the user must export,
written as one flow file whose comments say what is missing where."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from monitor.config import FileConfig, semantic_problems
from probes.errors import ConfigError

_NAME_START = re.compile(r"^[^A-Za-z_]+")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class ImportError_(ValueError):
    """The input cannot be imported at all (not JSON/YAML, not a collection, no modules)."""


@dataclass(frozen=True, slots=True)
class Untranslated:
    """One thing left out: where it was (`folder / request`), what, and the source text."""

    where: str
    what: str
    source: str = ""

    def line(self) -> str:
        text = f"{self.where}: {self.what}"
        if self.source:
            snippet = " ".join(self.source.split())
            text += f": {snippet[:160]}{'…' if len(snippet) > 160 else ''}"
        return text


@dataclass(slots=True)
class Export:
    """An environment variable the flows read (`${env:NAME}`): a secret kept out of the file."""

    name: str
    why: str


@dataclass(slots=True)
class FlowOut:
    """A flow being built: its fields (in output order), its steps and a comment per step."""

    fields: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)  # step name → comment lines
    comment: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ImportResult:
    """Everything an importer made; `complete` when nothing was left out."""

    source: str
    flows: list[FlowOut] = field(default_factory=list)
    untranslated: list[Untranslated] = field(default_factory=list)
    exports: dict[str, Export] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)  # values masked in what is reported

    @property
    def complete(self) -> bool:
        return not self.untranslated

    def keep_secret(self, value: object) -> None:
        if isinstance(value, str) and len(value) >= 4:  # shorter ones would mangle text
            self.secrets.add(value)

    def leave_out(self, where: str, what: str, source: str = "") -> Untranslated:
        """List something left out; a script or option quoting a secret shows `***`."""
        for secret in self.secrets:
            what, source = what.replace(secret, "***"), source.replace(secret, "***")
        item = Untranslated(where, what, source)
        self.untranslated.append(item)
        return item

    def export(self, name: str, why: str) -> str:
        """A `${env:NAME}` reference, noting that NAME must be exported."""
        self.exports.setdefault(name, Export(name, why))
        return "${env:" + name + "}"

    def document(self) -> dict[str, Any]:
        return {"flows": [{**f.fields, "steps": f.steps} for f in self.flows]}

    def validate(self) -> None:
        """Refuse to write a file `hopwatch validate` would refuse: that is our bug."""
        file = FileConfig.model_validate(self.document())
        problems = semantic_problems(file)
        if problems:
            raise ConfigError([message for _, message in problems])

    def to_yaml(self) -> str:
        out = [f"# Imported by `hopwatch import` from {self.source}."]
        if self.untranslated:
            out.append(f"# Not translated: {len(self.untranslated)} (listed at their steps).")
        else:
            out.append("# Everything was translated.")
        out.extend(f"# {note}" for note in self.notes)
        if self.exports:
            out.append("# Export before running:")
            out.extend(f"#   {e.name}  ({e.why})" for e in self.exports.values())
        placed = {line for f in self.flows for lines in f.notes.values() for line in lines}
        loose = [i for i in self.untranslated if "not translated: " + i.line() not in placed]
        if loose:
            out.append("# Not translated, with no step to show it at:")
            out.extend(f"#   {item.line()}" for item in loose)
        out.append("flows:")
        for flow in self.flows:
            out.extend(_flow_yaml(flow))
        return "\n".join(out) + "\n"


class _Dumper(yaml.SafeDumper):
    """Writes a line of text ending in a newline (a tcp `send`) as `"EHLO\\n"`, not folded
    over two lines."""


def _line(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if value.endswith("\n") and value.count("\n") == 1 else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _line)


def _dump(value: Any) -> list[str]:
    text = yaml.dump(value, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return text.rstrip("\n").split("\n")


def _indent(lines: list[str], first: str, rest: str) -> list[str]:
    return [(first if i == 0 else rest) + line for i, line in enumerate(lines)]


def _flow_yaml(flow: FlowOut) -> list[str]:
    out = [f"  # {line}" for line in flow.comment]
    out.extend(_indent(_dump(flow.fields), "  - ", "    "))
    out.append("    steps:")
    for step in flow.steps:
        out.extend(f"      # {line}" for line in flow.notes.get(step["name"], []))
        out.extend(_indent(_dump(step), "      - ", "        "))
    return out


def safe_name(text: str, taken: set[str] | None = None, fallback: str = "step") -> str:
    """`text` as a flow or step name (`[A-Za-z_][A-Za-z0-9_.-]*`), unique within `taken`."""
    name = _NAME_START.sub("", _NAME_CHARS.sub("_", text.strip())).strip("_") or fallback
    if taken is None:
        return name
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}_{n}", n + 1
    taken.add(unique)
    return unique


def identifier(text: str) -> str:
    """`text` as a template identifier (`steps.x.NAME`, `variant.NAME`)."""
    name = re.sub(r"\W+", "_", text).strip("_") or "value"
    return "_" + name if name[0].isdigit() else name


def env_name(prefix: str, text: str) -> str:
    """An environment variable name: PREFIX_TEXT in upper case."""
    return f"{prefix}_{identifier(text)}".upper()
