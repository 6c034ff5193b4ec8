"""`hopwatch gate`: the canary verdict for a pipeline step, as an exit code and a report.

Exit codes: 0 pass (or marginal with --allow-marginal, with a warning), 1 fail or marginal,
2 the gate could not be asked or answered (bad config or options, the store unreadable),
3 inconclusive (too few samples to tell).
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from monitor.config import Config, load
from monitor.engine import Engine, Options
from monitor.gate.models import GateError, GateRequest, GateResult, SourceUnavailable
from monitor.gate.service import evaluate
from monitor.gate.verdict import JudgeConfig, MetricResult
from monitor.lifecycle import run_async
from monitor.output import console_for, unwrapped
from probes.errors import ConfigError

__all__ = ["GateOutput", "gate", "render_table"]

EXIT_UNANSWERED = 2
CLASS_STYLE = {"pass": "green", "high": "bold red", "low": "cyan", "nodata": "yellow"}
VERDICT_STYLE = {"pass": "bold green", "marginal": "bold yellow", "fail": "bold red"}


class GateOutput(StrEnum):
    table = "table"
    json = "json"


def _fail(message: str) -> typer.Exit:
    Console(stderr=True).print(message, markup=False, highlight=False)
    return typer.Exit(EXIT_UNANSWERED)


def _load_config(paths: list[Path]) -> Config:
    try:
        return load(paths)
    except ConfigError as exc:
        raise _fail("\n".join(exc.problems)) from None


def _load_judge(path: Path | None) -> JudgeConfig:
    if path is None:
        return JudgeConfig()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return JudgeConfig.model_validate(data)
    except OSError as exc:
        raise _fail(f"{path}: cannot read: {exc.strerror}") from None
    except (yaml.YAMLError, ValidationError) as exc:
        raise _fail(f"{path}: not a judge config: {exc}") from None


def _problems(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"--{field.replace('_', '-')}: {message}" if field else message)
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value * 1000:.1f}"


def _side(metric: MetricResult, side: str) -> str:
    stats = metric.canary if side == "canary" else metric.baseline
    if metric.kind == "error_ratio":
        return "" if stats.mean is None else f"{stats.mean * 100:.1f}% of {stats.count}"
    return "" if stats.median is None else f"{_ms(stats.median)} ms ({stats.count})"


def render_table(result: GateResult, console: Console) -> None:
    """Per-metric findings, then the verdict and its reasons."""
    grid = Table(title=f"hopwatch gate: {result.request.canary} vs {result.request.baseline}")
    for column in ("flow", "metric", "result", "canary", "baseline", "ratio"):
        grid.add_column(column, overflow="fold", no_wrap=unwrapped(console))
    for flow in result.flows:
        for m in flow.verdict.metrics:
            word = m.classification + (" (critical)" if m.critical else "")
            style = "bold red" if m.failed else CLASS_STYLE[m.classification]
            ratio = "" if m.effect_size is None else f"{m.effect_size:.2f}"
            grid.add_row(
                flow.flow,
                m.name,
                f"[{style}]{word}[/]",
                _side(m, "canary"),
                _side(m, "baseline"),
                ratio,
            )
    console.print(grid)
    score = "n/a" if result.score is None else f"{result.score:.1f}"
    style = VERDICT_STYLE.get(result.verdict, "bold magenta")
    samples = ", ".join(
        f"{f.flow}: {f.canary_runs} canary / {f.baseline_runs} baseline runs" for f in result.flows
    )
    console.print(f"verdict: [{style}]{result.verdict}[/] (score {score}); {samples}")
    for reason in result.reasons:
        console.print(f"  - {reason}", markup=False, highlight=False)


async def _evaluate(
    config: Config, options: Options, request: GateRequest, store_url: str | None
) -> GateResult:
    engine = Engine(config, options)
    store: Any = None
    if request.burst is None:
        if store_url is None:
            raise GateError("--window reads past runs from the store: give --store URL")
        from monitor.store import Store  # only a window needs SQLAlchemy and a database

        store = Store(store_url)
        try:
            return await evaluate(request, engine=engine, store=store)
        finally:
            await store.close()
    try:
        await engine.start(schedule=False, admin=False)
    except (ValueError, OSError) as exc:
        await engine.stop()
        raise GateError(f"cannot start the monitor for the burst: {exc}") from exc
    try:
        return await evaluate(request, engine=engine, store=None)
    finally:
        await engine.stop()


def gate(
    paths: Annotated[list[Path], typer.Argument(help="Flow files or folders of them.")],
    flow: Annotated[
        list[str] | None, typer.Option(help="Flows to judge; default all with both variants.")
    ] = None,
    canary: Annotated[str, typer.Option(help="The canary variant.")] = "canary",
    baseline: Annotated[str, typer.Option(help="The baseline variant.")] = "stable",
    window: Annotated[
        str | None, typer.Option(help="Judge the store's runs of the last 10m, 1h, … (--store).")
    ] = None,
    burst: Annotated[
        int | None, typer.Option(help="Run each flow N times per variant now, and judge those.")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Burst runs in flight at once.")] = 8,
    min_samples: Annotated[
        int | None,
        typer.Option(help="Samples per variant each metric needs (default: judge's 10 / 20)."),
    ] = None,
    allow_marginal: Annotated[
        bool, typer.Option(help="Exit 0 (with a warning) on a marginal verdict instead of 1.")
    ] = False,
    critical: Annotated[
        list[str] | None,
        typer.Option(help="Metrics that fail the gate alone; default flow.error_ratio."),
    ] = None,
    judge_config: Annotated[
        Path | None, typer.Option(help="YAML file of judge thresholds (JudgeConfig).")
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(help="Store URL for --window: sqlite+aiosqlite:///hopwatch.db, …"),
    ] = None,
    location: Annotated[
        str | None, typer.Option(help="Location label (bursts); only its runs (windows).")
    ] = None,
    output: Annotated[GateOutput, typer.Option(help="table or json.")] = GateOutput.table,
    listen: Annotated[str, typer.Option(help="Public listener (webhooks), HOST:PORT.")] = (
        "127.0.0.1:8080"
    ),
    public_url: Annotated[
        str | None, typer.Option(help="URL senders should call back ({{ public_url }}).")
    ] = None,
) -> None:
    """Judge canary against baseline on the same flows: exit 0 pass, 1 fail, 3 inconclusive."""
    config = _load_config(paths)
    fields: dict[str, Any] = {
        "flow": flow or (),
        "canary": canary,
        "baseline": baseline,
        "window": window,
        "burst": burst,
        "concurrency": concurrency,
        "min_samples": min_samples,
        "allow_marginal": allow_marginal,
        "location": location,
        "judge": _load_judge(judge_config),
    }
    if critical:
        fields["critical"] = critical
    try:
        request = GateRequest.model_validate(fields)
    except ValidationError as exc:
        raise _fail(_problems(exc)) from None
    options = Options(listen=listen, public_url=public_url, location=location)
    try:
        result = run_async(_evaluate(config, options, request, store))
    except (GateError, SourceUnavailable) as exc:
        raise _fail(str(exc)) from None
    if output is GateOutput.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    else:
        render_table(result, console_for())
    raise typer.Exit(result.exit_code)
