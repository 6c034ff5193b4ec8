"""Where a problem sits in a flow file: its line (from the YAML nodes), the flow and step it is
in, and the field, formatted as `file:line: flow 'x' step 'y': field: message`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from probes import KINDS


def line_of(node: yaml.Node | None, loc: Sequence[int | str]) -> int:
    """The 1-based line of the deepest YAML node along a pydantic error location."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == part), None)
            if child is None:
                continue  # a union tag, or a missing field: stay on the mapping's line
            node = child
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
        else:
            continue  # union tags in the location (e.g. "http") have no node of their own
        line = node.start_mark.line + 1
    return line


def location_of(data: Any, loc: Sequence[int | str]) -> str:
    """`flow 'x' step 'y'` for an error location, from the raw data."""
    parts: list[str] = []
    if len(loc) >= 2 and loc[0] == "flows" and isinstance(loc[1], int):
        try:
            flow = data["flows"][loc[1]]
            parts.append(f"flow {flow.get('name', '#' + str(loc[1]))!r}")
            if len(loc) >= 4 and loc[2] in ("steps", "cleanup") and isinstance(loc[3], int):
                step = flow[loc[2]][loc[3]]
                label = "step" if loc[2] == "steps" else "cleanup step"
                parts.append(f"{label} {step.get('name', '#' + str(loc[3]))!r}")
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
    return " ".join(parts)


def field_of(loc: Sequence[int | str]) -> str:
    """The field path after the flow/step prefix, without union tags."""
    rest = list(loc)
    if rest[:1] == ["flows"]:
        rest = rest[4:] if len(rest) >= 4 and rest[2] in ("steps", "cleanup") else rest[2:]
    return ".".join(str(p) for p in rest if not _is_union_tag(p))


def _is_union_tag(part: int | str) -> bool:
    """Pydantic puts the union member in error locations: a kind name or a type like list[int]."""
    return isinstance(part, str) and (
        part in KINDS or "[" in part or part in {"int", "str", "float", "bool", "dict", "list"}
    )


def nodes(text: str) -> yaml.Node | None:
    """The node tree, for line numbers: composed only when there is an error to place."""
    return yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def format_problems(
    path: Path, node: yaml.Node | None, data: Any, errors: Sequence[tuple[Sequence[int | str], str]]
) -> list[str]:
    """`file:line: flow 'x' step 'y': field: message`, one line per problem."""
    problems: list[str] = []
    for loc, message in errors:
        where = location_of(data, loc)
        field = field_of(loc)
        text = f"{field}: {message}" if field else message
        prefix = f"{path}:{line_of(node, loc)}:"
        problem = f"{prefix} {where}: {text}" if where else f"{prefix} {text}"
        if not _merge_union_alternative(problems, problem):
            problems.append(problem)
    return problems


def _merge_union_alternative(problems: list[str], problem: str) -> bool:
    """Fold `x: want int` and `x: want list` for one field into one line with both wants."""
    head, _, message = problem.rpartition(": ")
    for i, earlier in enumerate(problems):
        if earlier.startswith(head + ": "):
            if message not in earlier:
                problems[i] = f"{earlier}; or {message[0].lower()}{message[1:]}"
            return True
    return False
