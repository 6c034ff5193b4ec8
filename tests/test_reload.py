"""Live reload: unchanged flows keep their schedule and runs, removed ones stop and leave
/metrics, added ones start, an invalid file keeps the old flows (and says so in the metric),
webhook paths follow; and the three triggers of a real process: --watch, POST /-/reload, SIGHUP."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from monitor.config import load
from monitor.demo.broker import TansuBroker, free_port
from monitor.engine import Engine, Options
from tests.fixtures.core import serve
from tests.test_http import STARTED, target_app
from tests.test_scheduler import Collect


@pytest.fixture
async def target() -> AsyncIterator[TestServer]:
    server = await serve(target_app())
    yield server
    await server.close()


def http_flow(name: str, base: str, path: str = "/json", interval: str = "100ms") -> str:
    return (
        f"  - {{name: {name}, interval: {interval}, timeout: 20s, jitter: 0s, "
        f"steps: [{{name: s, kind: http, url: '{base}{path}'}}]}}\n"
    )


def hook_flow(name: str, path: str) -> str:
    return (
        f"  - {{name: {name}, interval: 1h, steps: [{{name: w, kind: webhook_await, "
        f"path: {path}, within: 1s}}]}}\n"
    )


async def test_a_reload_keeps_unchanged_flows_stops_removed_and_starts_added(
    target: TestServer, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{target.port}"
    path = tmp_path / "flows.yaml"
    path.write_text(
        "flows:\n" + http_flow("kept", base) + http_flow("stuck", base, "/hang", "1h")
        + http_flow("edited", base)
    )  # fmt: skip
    sink = Collect()
    registry = CollectorRegistry()
    options = Options(config_paths=[path], extra_sinks=[sink], grace=0.1)
    engine = Engine(load([path]), options, registry)
    await engine.start(admin=False)
    try:
        assert engine.reloader is not None and engine.scheduler is not None
        await asyncio.wait_for(target.app[STARTED].wait(), 5)
        await sink.wait_for("kept", 2)
        await sink.wait_for("edited", 1)
        kept_slot = next(s for s in engine.scheduler._slots if s.flow.name == "kept")
        path.write_text(
            "flows:\n" + http_flow("kept", base) + http_flow("edited", base, "/json?v=2")
            + http_flow("added", base)
        )  # fmt: skip
        ok, summary = await engine.reloader.reload()
        assert (ok, summary) == (True, "1 added, 1 changed, 1 removed")
        [stuck] = sink.of("stuck")
        assert stuck.outcome == "aborted"  # a removed flow's run in flight stops
        gone = {"flow": "stuck", "variant": "default", "location": "local"}
        assert (
            registry.get_sample_value("hopwatch_runs_total", gone | {"outcome": "aborted"}) is None
        )
        kept = sink.of("kept")
        assert all(r.outcome == "success" for r in kept)
        assert any(s is kept_slot for s in engine.scheduler._slots)  # same grid, not restarted
        await sink.wait_for("added", 1)
        await sink.wait_for("kept", len(kept) + 1)
        edited = engine.config.flow("edited")
        assert edited.steps[0].url.endswith("/json?v=2")
        ran = len(sink.of("edited"))
        await sink.wait_for("edited", ran + 1)
        assert registry.get_sample_value("hopwatch_config_last_reload_successful") == 1.0
    finally:
        await engine.stop()


async def test_an_invalid_file_keeps_the_old_flows_and_says_why(
    target: TestServer, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{target.port}"
    path = tmp_path / "flows.yaml"
    path.write_text("flows:\n" + http_flow("kept", base))
    sink = Collect()
    registry = CollectorRegistry()
    engine = Engine(load([path]), Options(config_paths=[path], extra_sinks=[sink]), registry)
    await engine.start(admin=False)
    try:
        assert engine.reloader is not None
        await sink.wait_for("kept", 1)
        path.write_text("flows:\n  - {name: kept, steps: [{name: s, kind: htp}]}\n")
        ok, why = await engine.reloader.reload()
        assert not ok
        assert f"{path}:2:" in why and "unknown kind 'htp'" in why
        assert registry.get_sample_value("hopwatch_config_last_reload_successful") == 0.0
        assert registry.get_sample_value("hopwatch_config_reloads_total", {"result": "failed"})
        await sink.wait_for("kept", len(sink.of("kept")) + 2)  # still running
        before = registry.get_sample_value("hopwatch_config_last_reload_success_timestamp_seconds")
        path.write_text("flows:\n" + http_flow("kept", base) + http_flow("more", base))
        assert (await engine.reloader.reload())[0]
        assert registry.get_sample_value("hopwatch_config_last_reload_successful") == 1.0
        after = registry.get_sample_value("hopwatch_config_last_reload_success_timestamp_seconds")
        assert after is not None and before is not None and after >= before
    finally:
        await engine.stop()


async def test_webhook_paths_follow_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "flows.yaml"
    path.write_text("flows:\n" + hook_flow("old", "/hooks/old"))
    listen = f"127.0.0.1:{free_port()}"
    engine = Engine(load([path]), Options(listen=listen, config_paths=[path]))
    await engine.start(admin=False)
    try:
        assert engine.reloader is not None
        path.write_text("flows:\n" + hook_flow("new", "/hooks/new"))
        assert (await engine.reloader.reload())[0]
        async with aiohttp.ClientSession() as session:
            for hook, want in (("/hooks/new", 202), ("/hooks/old", 404)):
                async with session.post(f"http://{listen}{hook}", json={"a": 1}) as resp:
                    assert resp.status == want, hook
            async with session.get(f"http://{listen}/hooks/new") as resp:
                assert resp.status == 405
    finally:
        await engine.stop()


# -- a real process: --watch, POST /-/reload, SIGHUP ------------------------------------------


async def _metric(admin: str, name: str, labels: str = "") -> float | None:
    async with aiohttp.ClientSession() as session, session.get(f"http://{admin}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(f"{name}{labels} ") or line.startswith(f"{name}{{{labels}"):
                return float(line.rsplit(" ", 1)[1])
    return None


async def _until(check: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    pytest.fail("not within time")


async def test_a_running_monitor_reloads_on_watch_post_and_sighup(
    target: TestServer, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{target.port}"
    path = tmp_path / "flows.yaml"
    path.write_text("flows:\n" + http_flow("first", base))
    admin = f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "monitor", "run", str(path), "--watch", "--store", "none",
        "--admin-listen", admin, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    runs = 'hopwatch_runs_total{flow="%s",location="local",outcome="success",variant="default"}'

    def ran(flow: str) -> object:
        async def check() -> bool:
            try:
                return bool(await _metric(admin, runs % flow))
            except aiohttp.ClientError:
                return False

        return check

    try:
        await _until(ran("first"))
        path.write_text("flows:\n" + http_flow("first", base) + http_flow("watched", base))
        await _until(ran("watched"))  # --watch saw the file change

        path.write_text("flows: [{name: broken}]\n")
        reload = f"http://{admin}/-/reload"
        async with aiohttp.ClientSession() as session, session.post(reload) as resp:
            assert resp.status == 500
            assert "steps" in await resp.text()
        assert await _metric(admin, "hopwatch_config_last_reload_successful") == 0.0

        path.write_text("flows:\n" + http_flow("first", base) + http_flow("hupped", base))
        proc.send_signal(signal.SIGHUP)
        await _until(ran("hupped"))
        assert await _metric(admin, "hopwatch_config_last_reload_successful") == 1.0
        assert await _metric(admin, runs % "watched") is None  # removed: gone from /metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


@pytest.mark.kafka
async def test_a_reload_watches_the_topics_of_added_kafka_steps(
    tmp_path: Path, kafka_broker: TansuBroker, unique_topic: str
) -> None:
    cluster = f"kafka:\n  clusters: {{main: {{bootstrap_servers: '{kafka_broker.bootstrap}'}}}}\n"
    chain = (
        f"  - name: chain\n    interval: 1h\n    steps:\n"
        f"      - {{name: send, kind: kafka_produce, cluster: main, topic: {unique_topic}, "
        f"value: {{ref: '{{{{ run.correlation }}}}'}}}}\n"
        f"      - {{name: see, kind: kafka_consume, cluster: main, topic: {unique_topic}, "
        f"within: 5s, match: {{json: {{'$.ref': '{{{{ run.correlation }}}}'}}}}}}\n"
    )
    path = tmp_path / "flows.yaml"
    path.write_text(cluster + "flows:\n" + hook_flow("other", "/hooks/other"))
    engine = Engine(load([path]), Options(listen=f"127.0.0.1:{free_port()}", config_paths=[path]))
    await engine.start(admin=False)
    try:
        assert engine.reloader is not None and engine.kafka is not None
        path.write_text(cluster + "flows:\n" + chain)
        assert (await engine.reloader.reload())[0]
        assert engine.kafka.watching("main", unique_topic)
        await asyncio.wait_for(engine.kafka.wait_consumer("main"), 15)
        [result] = await engine.run_once(engine.select(["chain"]))
        assert result.outcome == "success", result.steps
    finally:
        await engine.stop()


async def test_a_reload_brings_new_incident_rules(target: TestServer, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{target.port}"
    path = tmp_path / "flows.yaml"
    path.write_text("flows:\n" + http_flow("kept", base, interval="1h"))
    options = Options(config_paths=[path], store_url=str(tmp_path / "h.db"), grace=0.1)
    engine = Engine(load([path]), options, CollectorRegistry())
    await engine.start(admin=False)
    try:
        assert engine.reloader is not None and engine.store is not None
        assert engine.store.book.policy.rules("kept").flap_window == 60.0
        edited = http_flow("kept", base, interval="1h").replace(
            "steps:", "incidents: {flap_window: 10m}, steps:"
        )
        path.write_text("flows:\n" + edited)
        ok, _ = await engine.reloader.reload()
        assert ok
        assert engine.store.book.policy.rules("kept").flap_window == 600.0
    finally:
        await engine.stop()


# -- what the admin listener and the store say after a reload ---------------------------------


async def test_the_api_and_the_status_page_follow_a_reload(
    target: TestServer, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{target.port}"
    path = tmp_path / "flows.yaml"
    path.write_text("flows:\n" + http_flow("kept_flow", base) + http_flow("removed_flow", base))
    admin = f"127.0.0.1:{free_port()}"
    options = Options(config_paths=[path], admin_listen=admin)
    engine = Engine(load([path]), options, CollectorRegistry())
    await engine.start(schedule=False)

    async def shown() -> tuple[set[str], str]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{admin}/api/v1/flows") as resp:
                assert resp.status == 200
                names = {f["name"] for f in (await resp.json())["flows"]}
            async with session.get(f"http://{admin}/") as resp:
                assert resp.status == 200
                return names, await resp.text()

    try:
        assert engine.reloader is not None
        names, page = await shown()
        assert names == {"kept_flow", "removed_flow"}
        assert "removed_flow" in page and "added_flow" not in page
        path.write_text("flows:\n" + http_flow("kept_flow", base) + http_flow("added_flow", base))
        assert (await engine.reloader.reload())[0]
        names, page = await shown()
        assert names == {"kept_flow", "added_flow"}
        assert "added_flow" in page and "kept_flow" in page
        assert "removed_flow" not in page
    finally:
        await engine.stop()


async def test_a_reload_closes_the_open_incidents_of_links_it_removes(
    target: TestServer, tmp_path: Path
) -> None:
    """A removed flow's incidents and a removed step's close as at a start; the rest stay."""
    from monitor.store.incidents import NOT_CONFIGURED

    base = f"http://127.0.0.1:{target.port}"
    broken = "/status/500"
    two_steps = (
        f"  - {{name: edited, interval: 1h, steps: [{{name: a, kind: http, url: '{base}/json'}},"
        f" {{name: b, kind: http, url: '{base}{broken}'}}]}}\n"
    )
    path = tmp_path / "flows.yaml"
    path.write_text(
        "flows:\n" + http_flow("gone", base, broken) + two_steps
        + http_flow("kept", base, broken)
    )  # fmt: skip
    options = Options(config_paths=[path], store_url=str(tmp_path / "h.db"), grace=0.1)
    engine = Engine(load([path]), options, CollectorRegistry())
    await engine.start(schedule=False, admin=False)
    try:
        assert engine.reloader is not None and engine.store is not None
        store = engine.store
        results = await engine.run_once(engine.select())
        assert {r.flow: r.outcome for r in results} == dict.fromkeys(
            ("gone", "edited", "kept"), "failure"
        )
        assert await store.flush()
        opened = (await store.list_incidents(status="open")).incidents
        assert {(i.flow, i.step) for i in opened} == {("gone", "s"), ("edited", "b"), ("kept", "s")}

        one_step = two_steps.replace(f", {{name: b, kind: http, url: '{base}{broken}'}}", "")
        path.write_text("flows:\n" + one_step + http_flow("kept", base, broken))
        assert (await engine.reloader.reload())[0]
        assert await store.flush()
        after = {(i.flow, i.step): i for i in (await store.list_incidents(status="all")).incidents}
        for link in (("gone", "s"), ("edited", "b")):
            assert (after[link].status, after[link].close_reason) == ("closed", NOT_CONFIGURED)
        assert after["kept", "s"].status == "open"
        # The kept link's incident goes on: its next failure extends it, opens no other.
        await engine.run_once(engine.select(["kept"]))
        assert await store.flush()
        [still] = (await store.list_incidents(status="open")).incidents
        assert (still.id, still.failures) == (after["kept", "s"].id, 2)
    finally:
        await engine.stop()
