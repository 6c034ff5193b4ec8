"""The `hopwatch` command line: run, check, validate, schema, demo (and gate, import)."""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from monitor import __version__
from monitor.cluster.settings import ClusterSettings
from monitor.config import Config, FileConfig, load, unresolved_secrets
from monitor.engine import Options
from monitor.gate.command import gate
from monitor.importers.command import import_app
from monitor.lifecycle import engine_or_exit, exit_with, run_async, serve_until_signal
from monitor.maintenance.command import maintenance_app
from monitor.output import as_json, as_junit, console_for, plural, table
from probes.errors import ConfigError

app = typer.Typer(
    name="hopwatch",
    help="Synthetic transactions through HTTP, webhooks and Kafka, timed and traced per hop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = console_for()
err = Console(stderr=True)

ConfigPaths = Annotated[list[Path], typer.Argument(help="Flow files or folders of them.")]
Listen = Annotated[str, typer.Option(help="Public listener (webhooks), HOST:PORT.")]
AdminListen = Annotated[str, typer.Option(help="Admin listener (/metrics, API, page), HOST:PORT.")]
PublicUrl = Annotated[
    str | None, typer.Option(help="URL senders should call back ({{ public_url }}).")
]
Location = Annotated[str | None, typer.Option(help="Location label, e.g. eu-west-1.")]
AdminToken = Annotated[
    str | None,
    typer.Option(envvar="HOPWATCH_ADMIN_TOKEN", help="Bearer token for a non-loopback admin."),
]
Store = Annotated[
    str,
    typer.Option(
        envvar="HOPWATCH_STORE",  # a URL with a password stays out of the command line
        help="Run history: a SQLite file, sqlite+aiosqlite:///path.db, "
        "postgresql+asyncpg://user@host/db, or 'none'.",
    ),
]


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    junit = "junit"


def _load_or_exit(paths: list[Path]) -> Config:
    """The merged config, or exit 2 printing every problem, unresolvable secrets included:
    a run would only fail later, on every delivery or request that needs them."""
    try:
        config = load(paths)
    except ConfigError as exc:
        exit_with(exc.problems)
    problems = unresolved_secrets(config)
    if problems:
        exit_with(problems)
    return config


def _cluster_settings(
    config: Config, cluster: str | None, group: str | None, replica: str | None
) -> ClusterSettings | None:
    """The flow files' `settings.cluster` with the command line's flags over it."""
    base = config.settings.cluster
    if base is None and cluster is None:
        if group is not None or replica is not None:
            exit_with(["--cluster-group and --replica need --cluster (or settings.cluster)"])
        return None
    raw: dict[str, Any] = base.model_dump(exclude_none=True) if base is not None else {}
    if cluster is not None:
        named = cluster in config.kafka.clusters
        raw.pop("kafka", None)
        raw.pop("bootstrap_servers", None)
        raw["kafka" if named else "bootstrap_servers"] = cluster
    if group is not None:
        raw["group"] = group
    if replica is not None:
        raw["replica"] = replica
    try:
        return ClusterSettings.model_validate(raw)
    except ValidationError as exc:
        exit_with([f"--cluster: {e['msg']}" for e in exc.errors(include_url=False)])


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level.lower() != "debug":
        # aiokafka logs every reconnect attempt at ERROR; monitor.kafka reports outages once.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


@app.command()
def validate(paths: ConfigPaths) -> None:
    """Check flow files (and that their secret references resolve here); print every problem
    as file:line and exit 2 if there is one."""
    config = _load_or_exit(paths)
    steps = sum(len(f.steps) for f in config.flows)
    out.print(
        f"ok: {plural(len(config.flows), 'flow')}, {plural(steps, 'step')} in "
        f"{plural(len(set(config.sources.values())), 'file')}"
    )


@app.command()
def schema() -> None:
    """Print the flow file's JSON Schema (for editors)."""
    out.print_json(json.dumps(FileConfig.model_json_schema()))


@app.command()
def check(
    paths: ConfigPaths,
    flow: Annotated[list[str] | None, typer.Option(help="Only these flows.")] = None,
    variant: Annotated[list[str] | None, typer.Option(help="Only these variants.")] = None,
    repeat: Annotated[int, typer.Option(min=1, help="Run each flow N times.")] = 1,
    output: Annotated[
        OutputFormat, typer.Option(help="table, json or junit.")
    ] = OutputFormat.table,
    listen: Listen = "127.0.0.1:8080",
    public_url: PublicUrl = None,
    location: Location = None,
) -> None:
    """Run each flow once (per variant) and exit 0 if every link passed, 1 if one broke."""
    _setup_logging("WARNING")
    config = _load_or_exit(paths)
    options = Options(listen=listen, public_url=public_url, location=location)

    async def main() -> list[Any]:
        engine = engine_or_exit(config, options)
        pairs = engine.select(flow or (), variant or ())
        if not pairs:
            err.print("no flow matches --flow/--variant")
            raise typer.Exit(2)
        try:
            await engine.start(schedule=False, admin=False)
        except OSError as exc:  # the public listener's port is taken, most likely
            await engine.stop()
            exit_with([f"cannot listen on {listen}: {exc.strerror}; choose another with --listen"])
        try:
            return await engine.run_once(pairs, repeat=repeat)
        finally:
            await engine.stop()

    results = run_async(main())
    if output is OutputFormat.json:
        sys.stdout.write(as_json(results) + "\n")
    elif output is OutputFormat.junit:
        sys.stdout.write(as_junit(results) + "\n")
    else:
        table(results, out)
    raise typer.Exit(0 if all(r.outcome == "success" for r in results) else 1)


@app.command()
def run(
    paths: ConfigPaths,
    listen: Listen = "127.0.0.1:8080",
    admin_listen: AdminListen = "127.0.0.1:9464",
    public_url: PublicUrl = None,
    location: Location = None,
    admin_token: AdminToken = None,
    store: Store = "hopwatch.db",
    grace: Annotated[float, typer.Option(help="Seconds in-flight runs get at shutdown.")] = 10.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    cluster: Annotated[
        str | None,
        typer.Option(
            help="Share the flows with the other replicas meeting on this Kafka "
            "(HOST:PORT, or a kafka.clusters name).",
        ),
    ] = None,
    cluster_group: Annotated[
        str | None, typer.Option(help="The replicas' consumer group (default hopwatch).")
    ] = None,
    replica: Annotated[
        str | None, typer.Option(help="This replica's name (default host name and pid).")
    ] = None,
    watch: Annotated[
        bool,
        typer.Option(help="Reload when a flow file changes (SIGHUP and POST /-/reload always do)."),
    ] = False,
) -> None:
    """Run every flow continuously and serve /metrics until SIGTERM/SIGINT."""
    _setup_logging(log_level)
    config = _load_or_exit(paths)
    cluster_settings = _cluster_settings(config, cluster, cluster_group, replica)
    options = Options(
        listen=listen,
        admin_listen=admin_listen,
        public_url=public_url,
        location=location,
        admin_token=admin_token,
        store_url=None if store == "none" else store,
        grace=grace,
        settle_gc=True,
        cluster=cluster_settings,
        config_paths=list(paths),
        watch=watch,
    )

    async def main() -> None:
        engine = engine_or_exit(config, options)
        try:
            await engine.start()
        except (ValueError, OSError) as exc:
            await engine.stop()
            err.print(f"cannot start: {exc}")
            raise typer.Exit(2) from None
        where = f" in cluster group {cluster_settings.group}" if cluster_settings else ""
        err.print(f"hopwatch {__version__}: {plural(len(config.flows), 'flow')}{where}; metrics on "
                  f"http://{admin_listen}/metrics")  # fmt: skip
        await serve_until_signal(engine)

    run_async(main())


@app.command()
def demo(
    listen: Listen = "127.0.0.1:8080",
    admin_listen: AdminListen = "127.0.0.1:9464",
    shop_listen: Annotated[str, typer.Option(help="The demo shop's address.")] = "127.0.0.1:8000",
    kafka: Annotated[
        str | None, typer.Option(help="Use this Kafka (HOST:PORT) instead of starting one.")
    ] = None,
    kafka_listen: Annotated[
        str, typer.Option(help="Where the demo's own broker listens.")
    ] = "127.0.0.1:9092",
    store: Store = "temporary",
    orders_db: Annotated[
        str | None,
        typer.Option(
            help="SQLAlchemy URL of the database the demo's worker writes its orders to; "
            "default: a SQLite file in the demo's temporary directory."
        ),
    ] = None,
    shop_only: Annotated[
        bool, typer.Option(help="Run only the demo system (shop, worker, webhooks), no monitor.")
    ] = False,
    duration: Annotated[
        float | None, typer.Option(help="Stop by itself after this many seconds.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "warning",
) -> None:
    """Start the bundled demo system and the monitor watching it, on loopback."""
    from monitor.demo.runner import run_demo

    _setup_logging(log_level)
    run_async(
        run_demo(
            listen=listen,
            admin_listen=admin_listen,
            shop_listen=shop_listen,
            kafka=kafka,
            kafka_listen=kafka_listen,
            store=store,
            duration=duration,
            console=err,
            shop_only=shop_only,
            orders_db=orders_db,
        )
    )


app.command()(gate)
app.add_typer(import_app, name="import")
app.add_typer(maintenance_app, name="maintenance")


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
