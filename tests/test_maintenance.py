"""Maintenance windows: declared (fixed, cron) and added at run time over the admin API and the
CLI; runs in one go on, stored and exported marked, open no incident; windows outlive a restart
and reach the other replicas through the store; the status page lists them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from monitor.cli import app as cli_app
from monitor.config import load
from monitor.engine import Engine, Options
from monitor.maintenance import MaintenanceBook, MaintenanceSpec, Window, parse_time
from monitor.store import IncidentBook, Store
from tests.fixtures.core import serve
from tests.fixtures.store import T0, make_run

BROKEN = web.AppKey("broken", list[bool])


@pytest.fixture
async def target() -> AsyncIterator[TestServer]:
    """Answers 200, or 503 while `app[BROKEN][0]` is true: a system under planned work."""
    app = web.Application()
    app[BROKEN] = [False]

    async def thing(request: web.Request) -> web.Response:
        return web.Response(status=503 if request.app[BROKEN][0] else 200, text="ok")

    app.router.add_get("/thing", thing)
    server = await serve(app)
    yield server
    await server.close()


def flows_text(base: str, extra: str = "") -> str:
    return (
        "flows:\n"
        "  - name: checkout\n"
        "    variants: {stable: {}, canary: {}}\n"
        f"    steps: [{{name: order, kind: http, url: '{base}/thing'}}]\n"
        "  - name: search\n"
        f"    steps: [{{name: query, kind: http, url: '{base}/thing'}}]\n" + extra
    )


# --- windows and schedules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unix"),
    [
        ("2026-12-06T02:00:00Z", 1796522400.0),
        ("2026-12-06T03:00:00+01:00", 1796522400.0),
        ("1796522400", 1796522400.0),
        (1796522400.5, 1796522400.5),
    ],
)
def test_times_are_rfc3339_or_unix_seconds(value: Any, unix: float) -> None:
    assert parse_time(value) == unix


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2026-12-06T02:00:00", "end: give a time zone"),
        ("next tuesday", "end: 'next tuesday' is neither RFC 3339"),
        (True, "end: want RFC 3339 or unix seconds"),
        ("nan", "end: 'nan' is neither RFC 3339"),
    ],
)
def test_bad_times_say_what_is_wanted(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_time(value, "end")


def test_a_cron_schedule_is_one_window_per_occurrence() -> None:
    """Saturdays 02:00 UTC for an hour: inside, outside, a run that overlaps the start."""
    saturday_2am = parse_time("2026-12-05T02:00:00Z")
    spec = MaintenanceSpec(
        flows=["checkout"], schedule="0 2 * * 6", duration="1h", reason="weekly upgrade"
    )
    now = [saturday_2am + 600]
    book = MaintenanceBook([spec], clock=lambda: now[0])
    assert book.covers("checkout", "stable", now[0], now[0] + 1)
    assert not book.covers("search", "default", now[0], now[0] + 1)  # another flow
    assert book.covers("checkout", "stable", saturday_2am - 5, saturday_2am + 1)  # overlaps
    assert not book.covers("checkout", "stable", saturday_2am - 5, saturday_2am - 1)
    active, *upcoming = book.windows()
    assert (active.status(now[0]), active.start, active.end) == (
        "active", saturday_2am, saturday_2am + 3600,
    )  # fmt: skip
    week = 7 * 86400
    assert [w.start - saturday_2am for w in upcoming] == [week]  # a week ahead is listed
    now[0] = saturday_2am + 3600  # the end is not inside
    book.refresh()
    assert not book.covers("checkout", "stable", now[0], now[0] + 1)
    assert book.next_boundary(now[0]) == saturday_2am + week


def test_variants_alone_cover_every_flow_of_them() -> None:
    window = Window("w", (), ("canary",), 0.0, 10.0, "canary cluster upgrade")
    assert window.applies("checkout", "canary") and window.applies("search", "canary")
    assert not window.applies("checkout", "stable")


# --- incidents ---------------------------------------------------------------------------------


def test_runs_in_a_window_open_no_incident_but_a_pass_still_closes_one() -> None:
    book = IncidentBook()
    failing = make_run(run_id="m1", fail_at="create_order", started_at=T0)
    failing.maintenance = True
    book.apply(failing)
    assert book.open_incidents() == []  # the failure was planned
    after = make_run(run_id="r1", fail_at="create_order", started_at=T0 + 60)
    book.apply(after)
    [incident] = book.open_incidents()
    assert incident.first_run_id == "r1"
    again = make_run(run_id="m2", fail_at="create_order", started_at=T0 + 120)
    again.maintenance = True
    book.apply(again)  # does not extend it either
    assert (incident.failures, incident.last_failed_run_id) == (1, "r1")
    passed = make_run(run_id="m3", started_at=T0 + 180)
    passed.maintenance = True
    book.apply(passed)
    assert book.open_incidents() == [] and incident.closing_run_id == "m3"


# --- a monitor with a store: the API, the runs, the gauge, the page ------------------------------


async def _json(resp: aiohttp.ClientResponse, status: int) -> Any:
    assert resp.status == status, await resp.text()
    return await resp.json()


async def test_a_window_added_over_the_api_marks_runs_and_keeps_incidents_shut(
    target: TestServer, tmp_path: Path, sqlite_url: str, port: Callable[[], int]
) -> None:
    base = f"http://127.0.0.1:{target.port}"
    path = tmp_path / "flows.yaml"
    path.write_text(flows_text(base))
    registry = CollectorRegistry()
    admin = f"127.0.0.1:{port()}"
    options = Options(admin_listen=admin, store_url=sqlite_url)
    engine = Engine(load([path]), options, registry)
    await engine.start(schedule=False)
    api = f"http://{admin}/api/v1/maintenance"
    checkout = engine.select(["checkout"], ["canary"])
    try:
        async with aiohttp.ClientSession() as http:
            body = {"flows": ["checkout"], "variants": ["canary"], "reason": "db upgrade"}
            body["end"] = time.time() + 3600
            window = await _json(await http.post(api, json=body), 201)
            assert window["status"] == "active" and window["source"] == "api"
            listed = await _json(await http.get(api), 200)
            assert [w["id"] for w in listed["windows"]] == [window["id"]]
            labels = {"flow": "checkout", "variant": "canary", "location": "local"}
            await _until(
                engine.maintenance,
                lambda: registry.get_sample_value("hopwatch_maintenance", labels) == 1,
            )
            stable = {**labels, "variant": "stable"}
            assert registry.get_sample_value("hopwatch_maintenance", stable) is None

            target.app[BROKEN][0] = True  # the planned work breaks the link
            [inside] = await engine.run_once(checkout)
            [stable_run] = await engine.run_once(engine.select(["checkout"], ["stable"]))
            assert (inside.outcome, inside.maintenance) == ("failure", True)
            assert stable_run.maintenance is False  # the window names canary only
            failed = {**labels, "outcome": "failure"}
            assert registry.get_sample_value("hopwatch_runs_total", failed) == 1  # exported
            store = engine.store
            assert store is not None and await store.flush()
            stored = await _json(await http.get(f"http://{admin}/api/v1/runs/{inside.run_id}"), 200)
            assert stored["maintenance"] is True
            incidents = (await store.list_incidents(status="open")).incidents
            assert [(i.variant, i.step) for i in incidents] == [("stable", "order")]
            page = await (await http.get(f"http://{admin}/")).text()
            assert f'data-window-id="{window["id"]}"' in page and "db upgrade" in page

            ended = await _json(await http.delete(f"{api}/{window['id']}"), 200)
            assert ended["status"] == "ended" and ended["end"] <= time.time()
            await _until(
                engine.maintenance,
                lambda: registry.get_sample_value("hopwatch_maintenance", labels) == 0,
            )
            [after] = await engine.run_once(checkout)
            assert after.maintenance is False
            assert await store.flush()
            incidents = (await store.list_incidents(status="open", variant="canary")).incidents
            assert [i.first_run_id for i in incidents] == [after.run_id]
            assert (await _json(await http.get(api), 200))["windows"] == []
    finally:
        await engine.stop()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"flows": ["checkout"], "reason": "x"}, 400, "end: Field required"),
        ({"flows": ["chekout"], "end": "2999-01-01T00:00:00Z", "reason": "x"}, 422,
         "unknown flows: 'chekout'"),
        ({"variants": ["blue"], "end": 32503680000, "reason": "x"}, 422,
         "no flow it covers has variants: 'blue'"),
        ({"end": 32503680000, "reason": "x"}, 422, "name the flows and/or variants"),
        ({"flows": ["search"], "end": 1000, "reason": "x"}, 422, "end is in the past"),
        ({"flows": ["search"], "start": 32503680000, "end": 32503670000, "reason": "x"}, 422,
         "end must be after start"),
        ({"flows": ["search"], "end": "tomorrow", "reason": "x"}, 400,
         "'tomorrow' is neither RFC 3339"),
        ({"flows": ["search"], "end": 32503680000, "reason": "x", "until": 1}, 400,
         "until: Extra inputs are not permitted"),
        ([1, 2], 400, "Input should be a valid dictionary"),
    ],
)  # fmt: skip
async def test_bad_windows_are_refused_with_the_reason(
    body: Any, status: int, message: str, tmp_path: Path, port: Callable[[], int]
) -> None:
    path = tmp_path / "flows.yaml"
    path.write_text(flows_text("http://127.0.0.1:9"))
    admin = f"127.0.0.1:{port()}"
    engine = Engine(load([path]), Options(admin_listen=admin), CollectorRegistry())
    await engine.start(schedule=False)
    try:
        async with aiohttp.ClientSession() as http:
            resp = await http.post(f"http://{admin}/api/v1/maintenance", json=body)
            assert message in (await _json(resp, status))["error"]
            resp = await http.post(f"http://{admin}/api/v1/maintenance", data=b"{")
            assert "not JSON" in (await _json(resp, 400))["error"]
            # nested past what json.loads can recurse: refused, never a 500
            deep = b"[" * 10_000 + b"]" * 10_000
            resp = await http.post(f"http://{admin}/api/v1/maintenance", data=deep)
            assert "nested deeper" in (await _json(resp, 400))["error"]
            resp = await http.delete(f"http://{admin}/api/v1/maintenance/nope")
            assert "no maintenance window 'nope'" in (await _json(resp, 404))["error"]
    finally:
        await engine.stop()


async def test_declared_windows_show_and_cannot_be_ended_over_the_api(
    tmp_path: Path, port: Callable[[], int]
) -> None:
    extra = (
        "maintenance:\n"
        "  - {variants: [default], start: 2020-01-01T00:00:00Z, end: 2999-01-01T00:00:00Z,"
        " reason: frozen for ever}\n"
    )
    path = tmp_path / "flows.yaml"
    path.write_text(flows_text("http://127.0.0.1:9", extra))
    admin = f"127.0.0.1:{port()}"
    engine = Engine(load([path]), Options(admin_listen=admin), CollectorRegistry())
    await engine.start(schedule=False)
    try:
        [run] = await engine.run_once(engine.select(["search"]))
        assert run.maintenance is True
        async with aiohttp.ClientSession() as http:
            [window] = (await _json(await http.get(f"http://{admin}/api/v1/maintenance"), 200))[
                "windows"
            ]
            assert (window["source"], window["reason"]) == ("config", "frozen for ever")
            resp = await http.delete(f"http://{admin}/api/v1/maintenance/{window['id']}")
            assert "declared in a flow file" in (await _json(resp, 409))["error"]
    finally:
        await engine.stop()


async def test_a_reload_brings_the_flow_files_new_windows(tmp_path: Path) -> None:
    path = tmp_path / "flows.yaml"
    path.write_text(flows_text("http://127.0.0.1:9"))
    registry = CollectorRegistry()
    engine = Engine(load([path]), Options(config_paths=[path]), registry)
    await engine.start(schedule=False, admin=False)
    try:
        now = time.time()
        assert not engine.maintenance.covers("search", "default", now, now)
        path.write_text(
            flows_text(
                "http://127.0.0.1:9",
                f"maintenance:\n  - {{flows: [search], start: {now - 1}, end: {now + 600},"
                " reason: reindex}\n",
            )
        )
        assert engine.reloader is not None
        assert (await engine.reloader.reload())[0]
        assert engine.maintenance.covers("search", "default", now, now)
        labels = {"flow": "search", "variant": "default", "location": "local"}
        gauge = lambda: registry.get_sample_value("hopwatch_maintenance", labels)  # noqa: E731
        await _until(engine.maintenance, lambda: gauge() == 1)
    finally:
        await engine.stop()


# --- shared through the store: restarts and replicas ---------------------------------------------


@pytest.mark.postgres
async def test_runtime_windows_survive_a_restart_and_reach_other_replicas(pg_url: str) -> None:
    now = time.time()
    first, second = Store(pg_url), Store(pg_url)
    await first.migrate()
    try:
        one = MaintenanceBook(store=first)
        other = MaintenanceBook(store=second, poll_s=0.05)
        window = await one.add(
            flows=["checkout"], variants=[], start=now, end=now + 600, reason="upgrade"
        )
        assert one.covers("checkout", "stable", now + 1, now + 2)
        keeping = asyncio.create_task(other.keep(lambda: [("checkout", "stable", "local")]))
        try:
            await _until(other, lambda: other.covers("checkout", "stable", now + 1, now + 2))
            [seen] = other.windows()
            assert (seen.id, seen.reason, seen.flows) == (window.id, "upgrade", ("checkout",))
            await one.end(window.id)  # ended on one replica: the other follows
            await _until(
                other, lambda: not other.covers("checkout", "stable", time.time(), time.time())
            )
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)
        restarted = MaintenanceBook(store=Store(pg_url))
        assert restarted.store is not None
        await restarted.sync()
        assert [w.id for w in restarted.runtime.values()] == [window.id]
        await restarted.store.close()  # type: ignore[attr-defined]
    finally:
        await first.close()
        await second.close()


async def test_without_a_store_windows_are_kept_in_memory() -> None:
    book = MaintenanceBook()
    now = time.time()
    future = await book.add(flows=["a"], variants=[], start=now + 60, end=now + 120, reason="later")
    assert [w.id for w in book.windows()] == [future.id]
    cancelled = await book.end(future.id)  # not started: cancelled
    assert cancelled.end == cancelled.start and book.windows() == []
    assert not book.covers("a", "default", now + 50, now + 70)


# --- the command line ----------------------------------------------------------------------------


async def _cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """`hopwatch maintenance ...` in a thread, so that the monitor in this loop can answer."""
    runner = CliRunner()
    argv = ["maintenance", *args]
    result = await asyncio.to_thread(runner.invoke, cli_app, argv, env=env)
    return result.exit_code, result.stdout, result.stderr


async def test_the_cli_adds_lists_and_ends_windows_with_the_token(
    tmp_path: Path, port: Callable[[], int]
) -> None:
    path = tmp_path / "flows.yaml"
    path.write_text(flows_text("http://127.0.0.1:9"))
    admin = f"127.0.0.1:{port()}"
    engine = Engine(
        load([path]), Options(admin_listen=admin, admin_token="s3cret"), CollectorRegistry()
    )
    await engine.start(schedule=False)
    url = ["--admin", f"http://{admin}"]
    env = {"HOPWATCH_ADMIN_TOKEN": "s3cret", "HOPWATCH_ADMIN_URL": ""}
    try:
        code, out, err = await _cli(
            "add", "--flow", "search", "--duration", "30m", "--reason", "reindex", "--json",
            *url, env=env,
        )  # fmt: skip
        assert code == 0, err
        added = json.loads(out)
        assert added["flows"] == ["search"] and 1790 < added["end"] - added["start"] <= 1800
        code, out, _ = await _cli("list", *url, env=env)
        assert code == 0 and added["id"] in out and "reindex" in out
        code, out, _ = await _cli("end", added["id"], *url, env=env)
        assert code == 0 and out.startswith(f"ended {added['id']} at ")
        code, out, _ = await _cli("list", *url, env=env)
        assert out == "no active or upcoming maintenance windows\n"
        no_token = {**env, "HOPWATCH_ADMIN_TOKEN": ""}
        code, _, err = await _cli("list", *url, env=no_token)
        assert code == 2 and "401: bearer token required" in err
        code, _, err = await _cli("add", "--flow", "x", "--reason", "r", *url, env=env)
        assert code == 2 and "give --end or --duration" in err
        code, _, err = await _cli(
            "add", "--flow", "chekout", "--duration", "1h", "--reason", "r", *url, env=env
        )
        assert code == 2 and "422: unknown flows: 'chekout'" in err
    finally:
        await engine.stop()


async def _until(book: MaintenanceBook, condition: Callable[[], bool]) -> None:
    """Wait for the book's loop (the gauge, a replica's poll) to make `condition` true."""
    async with asyncio.timeout(10):
        await book.wait_until(condition)
