"""How `hopwatch check` reports runs: a rich table, JSON for pipelines, JUnit XML for CI servers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from xml.etree import ElementTree as ET

from rich.console import Console
from rich.table import Table

from monitor.results import RunResult

STATUS_STYLE = {"passed": "green", "failed": "bold red", "skipped": "yellow", "aborted": "magenta"}


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.1f}"


def table(results: Sequence[RunResult], console: Console) -> None:
    grid = Table(title="hopwatch check", show_lines=False)
    for column in ("flow", "variant", "step", "kind", "status", "ms", "reason", "detail"):
        grid.add_column(column, overflow="fold")
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
                (step.message or "")[:200],
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
