"""Faults to hopwatch itself: a real `hopwatch run` process sent SIGTERM mid-run, SIGTERM twice,
or SIGKILL. Every run the target saw is in the store once (SIGKILL loses at most what was in
flight or not yet written, and a restart on the same store carries on), hopwatch_runs_total
agrees, the run in flight is recorded as aborted, and no healthy run failed."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.fixtures.core import free_port, serve
from tests.fixtures.faults import Row, assert_grid, scaled, store_rows

HOPWATCH = [sys.executable, "-m", "monitor"]
STEADY = 0.2
STORE_LINGER_S = 0.25  # monitor.store.Store's default: what SIGKILL may find unwritten


@dataclass
class Seen:
    """What the target saw: each run id (the marker header) with when it arrived, per path."""

    runs: dict[str, dict[str, float]] = field(default_factory=lambda: {"ok": {}, "hang": {}})
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, path: str, count: int, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while len(self.runs[path]) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def seen() -> AsyncIterator[tuple[Seen, TestServer]]:
    record = Seen()

    async def handle(request: web.Request) -> web.Response:
        path = request.match_info["path"]
        record.runs[path][request.headers["X-Hopwatch-Run"]] = time.time()
        record.changed.set()
        if path == "hang":
            await asyncio.sleep(120)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/{path}", handle)
    server = await serve(app)
    yield record, server
    await server.close()


@dataclass
class Hopwatch:
    proc: asyncio.subprocess.Process
    admin: str
    store: str

    async def runs_total(self) -> dict[tuple[str, str], float]:
        async with aiohttp.ClientSession() as http, http.get(f"http://{self.admin}/metrics") as r:
            text = await r.text()
        totals: dict[tuple[str, str], float] = {}
        for m in re.finditer(r"^hopwatch_runs_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
            if float(m[2]):
                totals[labels["flow"], labels["outcome"]] = float(m[2])
        return totals

    async def ended(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


async def hopwatch_run(tmp_path: Path, target: TestServer, grace: float) -> Hopwatch:
    flows = tmp_path / "flows.yaml"
    base = f"http://127.0.0.1:{target.port}"
    flows.write_text(
        "flows:\n"
        f"  - {{name: steady, interval: {STEADY}s, jitter: 0s, timeout: 5s, "
        f"steps: [{{name: ok, kind: http, url: '{base}/ok'}}]}}\n"
        "  - {name: stuck, interval: 1h, jitter: 0s, timeout: 5m, "
        f"steps: [{{name: wait, kind: http, url: '{base}/hang'}}]}}\n"
    )
    admin, store = f"127.0.0.1:{free_port()}", str(tmp_path / "hopwatch.db")
    proc = await asyncio.create_subprocess_exec(
        *HOPWATCH, "run", str(flows), "--admin-listen", admin, "--store", store,
        "--grace", str(grace), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return Hopwatch(proc, admin, f"sqlite+aiosqlite:///{store}")


async def settled_totals(hw: Hopwatch, seen: Seen) -> dict[tuple[str, str], float]:
    """runs_total once every steady run the target answered is counted (polled: the process
    is another one), as read while the grace holds the stuck run open."""
    async with asyncio.timeout(10):
        while True:
            totals = await hw.runs_total()
            if totals.get(("steady", "success"), 0) >= len(seen.runs["ok"]):
                return totals
            await asyncio.sleep(0.05)  # another process's counter: read it again


def assert_once_each(rows: list[Row], seen: Seen) -> None:
    ids = [row[0] for row in rows]
    assert len(ids) == len(set(ids)), "a run stored twice"
    steady = [row for row in rows if row[1] == "steady"]
    assert all(row[2] == "success" for row in steady), "false failures"
    assert_grid([row[3] for row in steady], STEADY, "steady")


@pytest.mark.parametrize("second_sigterm", [False, True], ids=["SIGTERM", "SIGTERM twice"])
async def test_sigterm_records_every_run_once_and_the_one_in_flight_as_aborted(
    second_sigterm: bool, seen: tuple[Seen, TestServer], tmp_path: Path
) -> None:
    record, target = seen
    grace = 60.0 if second_sigterm else 1.0  # twice: the second signal, not the grace, ends it
    hw = await hopwatch_run(tmp_path, target, grace)
    try:
        await record.wait("hang", 1)
        await record.wait("ok", scaled(10))
        hw.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        totals = await settled_totals(hw, record)  # the admin listener lasts the grace
        if second_sigterm:
            assert hw.proc.returncode is None
            hw.proc.send_signal(signal.SIGTERM)
        code = await hw.ended(grace + 10)
        took = time.monotonic() - signalled
    finally:
        if hw.proc.returncode is None:
            hw.proc.kill()
            await hw.proc.wait()
    assert code == 0
    assert took < (5 if second_sigterm else grace + 5), took
    rows = await store_rows(hw.store)
    assert_once_each(rows, record)
    stored = {row[0]: row for row in rows}
    assert set(stored) == set(record.runs["ok"]) | set(record.runs["hang"]), "a run was lost"
    [stuck] = record.runs["hang"]
    assert stored[stuck][2] == "aborted"
    # read during the grace: every steady run, the stuck one not yet ended
    assert totals == {("steady", "success"): len(record.runs["ok"])}


async def test_sigkill_loses_only_what_was_in_flight_and_a_restart_carries_on(
    seen: tuple[Seen, TestServer], tmp_path: Path
) -> None:
    record, target = seen
    hw = await hopwatch_run(tmp_path, target, 1.0)
    try:
        await record.wait("hang", 1)
        await record.wait("ok", scaled(10))
        hw.proc.send_signal(signal.SIGKILL)
        killed = time.time()
        assert await hw.ended(10) == -signal.SIGKILL
    finally:
        if hw.proc.returncode is None:
            hw.proc.kill()
            await hw.proc.wait()
    before = await store_rows(hw.store)
    assert_once_each(before, record)
    seen_before = record.runs["ok"] | record.runs["hang"]
    stored = {row[0] for row in before}
    assert stored <= set(seen_before), "stored a run the target never saw"
    lost = {run: at for run, at in seen_before.items() if run not in stored}
    assert next(iter(record.runs["hang"])) in lost  # in flight: nothing can record it
    late = {run: killed - at for run, at in lost.items() if run not in record.runs["hang"]}
    assert all(age < STORE_LINGER_S + 1.0 for age in late.values()), late  # not yet written

    steady_before = len(record.runs["ok"])
    again = await hopwatch_run(tmp_path, target, 1.0)  # same store, same flows
    try:
        await record.wait("ok", steady_before + scaled(5))
        again.proc.send_signal(signal.SIGTERM)
        assert await again.ended(15) == 0
    finally:
        if again.proc.returncode is None:
            again.proc.kill()
            await again.proc.wait()
    after = await store_rows(again.store)
    assert {row[0] for row in after if row[0] in stored} == stored  # kept, not rewritten
    new = [row for row in after if row[0] not in stored]
    assert_once_each(new, record)
    assert {row[0] for row in new} == set(record.runs["ok"] | record.runs["hang"]) - set(
        seen_before
    ), "a run after the restart was lost"
