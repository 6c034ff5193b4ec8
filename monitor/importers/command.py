"""`hopwatch import postman|blackbox`: write the flow file, list on stderr what was not
translated, and exit 0 when the import is complete, 1 when something was left out, 2 when
the input cannot be imported."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from monitor.importers.report import ImportError_, ImportResult
from probes.errors import ConfigError

import_app = typer.Typer(
    help="Turn Postman collections or blackbox_exporter modules into flow files.",
    no_args_is_help=True,
)
Output = Annotated[
    Path | None, typer.Option("--output", "-o", help="Flow file to write; default stdout.")
]


def _read(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        _fail(f"{path}: cannot read the {what}: {exc.strerror}")
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        _fail(f"{path}: the {what} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
              f"{exc}")  # fmt: skip


def _fail(message: str) -> Any:
    sys.stderr.write(message + "\n")
    raise typer.Exit(2)


def finish(result: ImportResult, output: Path | None) -> None:
    """Check the flows load, write them, report what is missing, exit 0 or 1."""
    try:
        result.validate()
    except (ConfigError, ValueError) as exc:  # our bug: never write a file that cannot load
        _fail(f"internal error: the imported flows do not validate: {exc}")
    text = result.to_yaml()
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
    steps = sum(len(f.steps) for f in result.flows)
    where = f" to {output}" if output else ""
    sys.stderr.write(f"imported {len(result.flows)} flows, {steps} steps{where}\n")
    for export in result.exports.values():
        sys.stderr.write(f"export {export.name}  ({export.why})\n")
    for item in result.untranslated:
        sys.stderr.write(f"not translated: {item.line()}\n")
    if result.untranslated:
        sys.stderr.write(f"{len(result.untranslated)} items not translated: the import is "
                         "incomplete\n")  # fmt: skip
    raise typer.Exit(0 if result.complete else 1)


@import_app.command()
def postman(
    collection: Annotated[Path, typer.Argument(help="Collection file (v2.0 or v2.1 JSON).")],
    environment: Annotated[
        Path | None, typer.Option("--environment", "-e", help="Environment file (JSON).")
    ] = None,
    output: Output = None,
    one_flow: Annotated[
        bool, typer.Option("--one-flow", help="One flow for the whole collection.")
    ] = False,
) -> None:
    """A Postman collection as flows: folders → flows, requests → http steps."""
    from monitor.importers.postman import import_postman

    env = _read(environment, "environment") if environment is not None else None
    try:
        result = import_postman(
            _read(collection, "collection"), env, one_flow=one_flow, source=collection.name
        )
    except ImportError_ as exc:
        _fail(f"{collection}: {exc}")
    finish(result, output)


@import_app.command()
def blackbox(
    config: Annotated[Path, typer.Argument(help="blackbox_exporter configuration (YAML).")],
    prometheus: Annotated[
        Path | None,
        typer.Option("--prometheus", help="Prometheus configuration whose jobs give targets."),
    ] = None,
    output: Output = None,
) -> None:
    """blackbox_exporter modules, with their scrape jobs' targets, as flows."""
    from monitor.importers.blackbox import import_blackbox

    scrape = _read(prometheus, "Prometheus configuration") if prometheus is not None else None
    try:
        result = import_blackbox(_read(config, "configuration"), scrape, source=config.name)
    except ImportError_ as exc:
        _fail(f"{config}: {exc}")
    finish(result, output)
