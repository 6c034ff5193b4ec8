"""How `hopwatch check` reports runs: a rich table, JSON for pipelines, JUnit XML for CI servers."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TextIO
from xml.etree import ElementTree as ET

from rich.console import Console
from rich.table import Table

from monitor.results import RunResult

STATUS_STYLE = {"passed": "green", "failed": "bold red", "skipped": "yellow", "aborted": "magenta"}


# Wide enough for any row: a CI log or a file is read unwrapped, a name never breaks mid-word.
UNWRAPPED_WIDTH = 100_000
DETAIL_ON_TERMINAL = 200  # characters of a failure's detail in a terminal's table


def console_for(stream: TextIO | None = None) -> Console:
    """A console for `stream` (stdout): a terminal's own width, else full-width and unwrapped
    (CI logs, pipes, files), whatever COLUMNS says."""
    stream = sys.stdout if stream is None else stream
    if stream.isatty():
        return Console(file=stream)
    return Console(file=stream, width=UNWRAPPED_WIDTH, soft_wrap=True)


def unwrapped(console: Console) -> bool:
    return console.width >= UNWRAPPED_WIDTH


def plural(count: int, noun: str) -> str:
    """`1 flow`, `2 flows`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.1f}"


def table(results: Sequence[RunResult], console: Console) -> None:
    grid = Table(title="hopwatch check", show_lines=False)
    full = unwrapped(console)
    for column in ("flow", "variant", "step", "kind", "status", "ms", "reason", "detail"):
        grid.add_column(column, overflow="fold", no_wrap=full)
    for run in results:
        for step in run.steps:
            style = STATUS_STYLE.get(step.status, "")
            name = f"{step.name} (cleanup)" if step.cleanup else step.name
            grid.add_row(
                run.flow,
                run.variant,
                name,
                step.kind,
                f"[{style}]{step.status}[/]",
                _ms(step.latency_s),
                step.reason or "",
                (step.message or "")[: None if full else DETAIL_ON_TERMINAL],
            )
    console.print(grid)
    failed = [r for r in results if r.outcome != "success"]
    summary = f"{len(results) - len(failed)}/{len(results)} runs passed"
    if failed:
        broken = {(r.flow, r.variant, b.name, b.reason) for r in failed if (b := r.broken)}
        links = ", ".join(f"{f}/{v}:{s} ({why})" for f, v, s, why in sorted(broken, key=str))
        summary += f"; broken: {links}"
    console.print(summary)


def as_json(results: Sequence[RunResult]) -> str:
    return json.dumps(
        {
            "passed": all(r.outcome == "success" for r in results),
            "runs": [r.to_dict() for r in results],
        },
        indent=2,
        default=str,
    )


def as_junit(results: Sequence[RunResult]) -> str:
    """One testsuite per (flow, variant) run, one testcase per hop."""
    suites = ET.Element("testsuites", name="hopwatch")
    for run in results:
        hops = run.hops
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=f"{run.flow}[{run.variant}]",
            tests=str(len(hops)),
            failures=str(sum(1 for s in hops if s.status == "failed")),
            skipped=str(sum(1 for s in hops if s.status != "passed" and s.status != "failed")),
            time=f"{run.duration_s:.3f}",
        )
        for step in hops:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"{run.flow}.{run.variant}",
                name=step.name,
                time=f"{step.latency_s or 0:.3f}",
            )
            if step.status == "failed":
                failure = ET.SubElement(
                    case,
                    "failure",
                    message=f"{step.reason}: {step.message}",
                    type=step.reason or "",
                )
                failure.text = step.excerpt or step.message or ""
            elif step.status != "passed":
                ET.SubElement(case, "skipped", message=step.message or "after a broken link")
        props = ET.SubElement(suite, "properties")
        ET.SubElement(props, "property", name="run_id", value=run.run_id)
        if run.trace_id:
            ET.SubElement(props, "property", name="trace_id", value=run.trace_id)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)
