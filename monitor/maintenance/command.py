"""`hopwatch maintenance add|list|end`: a client of a running monitor's admin API (any replica)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from monitor.maintenance.windows import parse_time, rfc3339
from probes.durations import parse_duration

maintenance_app = typer.Typer(
    help="Maintenance windows of a running monitor: runs go on, marked, but page nobody.",
    no_args_is_help=True,
)

Admin = Annotated[
    str,
    typer.Option(envvar="HOPWATCH_ADMIN_URL", help="The monitor's admin listener, as a URL."),
]
Token = Annotated[
    str | None,
    typer.Option(envvar="HOPWATCH_ADMIN_TOKEN", help="Bearer token of the admin listener."),
]
Json = Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")]
DEFAULT_ADMIN = "http://127.0.0.1:9464"
PATH = "/api/v1/maintenance"


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"hopwatch maintenance: {message}\n")
    raise typer.Exit(2)


def _call(admin: str, token: str | None, method: str, path: str, body: Any = None) -> Any:
    """One request to the admin API; exits 2 with the API's own error when it refuses."""
    url = admin.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            text = json.loads(text)["error"]
        _fail(f"{method} {url}: {exc.code}: {text}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        _fail(f"{method} {url}: cannot reach the monitor: {reason}")


def _print(windows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(windows if len(windows) != 1 else windows[0], indent=2) + "\n")
        return
    table = Table("id", "status", "flows", "variants", "start", "end", "reason", "source")
    for w in windows:
        table.add_row(
            w["id"], w["status"], ", ".join(w["flows"]) or "every flow",
            ", ".join(w["variants"]) or "every variant", w["start_time"], w["end_time"],
            w["reason"], w["source"],
        )  # fmt: skip
    Console(width=200).print(table)


@maintenance_app.command("add")
def add(
    reason: Annotated[str, typer.Option(help="Why; shown on the page, API and runs.")],
    flow: Annotated[list[str] | None, typer.Option(help="A flow it covers (repeat).")] = None,
    variant: Annotated[list[str] | None, typer.Option(help="A variant it covers (repeat).")] = None,
    start: Annotated[
        str | None, typer.Option(help="RFC 3339 or unix seconds; default now.")
    ] = None,
    end: Annotated[str | None, typer.Option(help="RFC 3339 or unix seconds.")] = None,
    duration: Annotated[
        str | None, typer.Option(help="Instead of --end: how long, e.g. 30m, 2h.")
    ] = None,
    admin: Admin = DEFAULT_ADMIN,
    admin_token: Token = None,
    as_json: Json = False,
) -> None:
    """Add a window now or later: its runs open no incident and leave the SLO alone."""
    if (end is None) == (duration is None):
        _fail("give --end or --duration")
    try:
        begins = time.time() if start is None else parse_time(start, "--start")
        ends = parse_time(end, "--end") if end is not None else begins + parse_duration(duration)
    except ValueError as exc:
        _fail(str(exc))
    body: dict[str, Any] = {"flows": flow or [], "variants": variant or [], "end": ends}
    body["reason"] = reason
    if start is not None:
        body["start"] = begins
    _print([_call(admin, admin_token, "POST", PATH, body)], as_json)


@maintenance_app.command("list")
def list_windows(
    admin: Admin = DEFAULT_ADMIN, admin_token: Token = None, as_json: Json = False
) -> None:
    """Active and upcoming windows, soonest first."""
    windows = _call(admin, admin_token, "GET", PATH)["windows"]
    if as_json:
        sys.stdout.write(json.dumps(windows, indent=2) + "\n")
    elif not windows:
        sys.stdout.write("no active or upcoming maintenance windows\n")
    else:
        _print(windows, False)


@maintenance_app.command("end")
def end_window(
    window_id: Annotated[str, typer.Argument(help="The window's id (from add or list).")],
    admin: Admin = DEFAULT_ADMIN,
    admin_token: Token = None,
    as_json: Json = False,
) -> None:
    """End a window now; one that has not started yet is cancelled."""
    quoted = urllib.parse.quote(window_id, safe="")
    window = _call(admin, admin_token, "DELETE", f"{PATH}/{quoted}")
    if as_json:
        _print([window], True)
    else:
        sys.stdout.write(f"ended {window['id']} at {rfc3339(window['end'])}\n")
