"""What the cluster benchmark starts and reads: replica processes, a PostgreSQL database of its
own, the webhook emitter (the system under watch calling back), and /metrics samples.

Replicas are `python -m monitor run FLOWS --replica NAME` processes, as users run them; their
figures are read from the outside only (`/metrics`, `/api/v1/cluster`, the shared store).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
from aiohttp import web

from benchmarks.common import ROOT, free_port, proc_cpu_s, runqueue_wait_s

PG_HOST, PG_PORT, PG_ADMIN_DB, PG_USERS = "127.0.0.1", 5432, "test", ("postgres", "root")


# -- PostgreSQL -------------------------------------------------------------------------------


async def _admin() -> tuple[asyncpg.Connection, str]:
    errors = []
    for user in PG_USERS:
        try:
            conn = await asyncpg.connect(
                host=PG_HOST, port=PG_PORT, user=user, database=PG_ADMIN_DB, timeout=5
            )
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            errors.append(f"{user}: {exc}")
            continue
        return conn, user
    raise RuntimeError(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT}: {'; '.join(errors)}")


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for one scenario (its URL for `--store`), dropped after."""
    name = f"hopwatch_bench_{uuid.uuid4().hex[:10]}"
    conn, user = await _admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield f"postgresql+asyncpg://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        conn, _ = await _admin()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def runs(store_url: str) -> list[asyncpg.Record]:
    """Every run the cluster wrote, ordered by flow and start."""
    conn = await asyncpg.connect(store_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return list(
            await conn.fetch(
                "SELECT flow, replica, outcome, started_at, finished_at, duration_s FROM runs "
                "ORDER BY flow, started_at"
            )
        )
    finally:
        await conn.close()


def overlapping_flows(rows: list[asyncpg.Record]) -> list[str]:
    """Flows with two runs in flight at once (a run starting before the previous finished)."""
    found: set[str] = set()
    last: dict[str, float] = {}
    for row in rows:  # ordered by flow, started_at
        flow = row["flow"]
        if flow in last and row["started_at"] + 0.001 < last[flow]:
            found.add(flow)
        last[flow] = max(last.get(flow, 0.0), row["finished_at"])
    return sorted(found)


# -- replicas ---------------------------------------------------------------------------------


@dataclass
class Replica:
    """One `hopwatch run` process of the cluster."""

    name: str
    flows: Path
    store: str
    log: Path
    core: int | None = None
    log_level: str = "warning"
    listen: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        core = self.core
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", str(self.flows), "--replica", self.name,
             "--store", self.store, "--listen", f"127.0.0.1:{self.listen}",
             "--admin-listen", f"127.0.0.1:{self.admin}", "--grace", "1",
             "--log-level", self.log_level],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log.open("wb"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if core is not None else None,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int | None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.proc is not None and self.proc.poll() is None:
            if asyncio.get_running_loop().time() > deadline:
                return None
            await asyncio.sleep(0.05)
        return None if self.proc is None else self.proc.returncode

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if await self.wait(15) is None:
                self.proc.kill()
                self.proc.wait()

    async def get(self, session: aiohttp.ClientSession, path: str) -> Any:
        url = f"http://127.0.0.1:{self.admin}{path}"
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=60)) as response:
            response.raise_for_status()
            return await (response.json() if path.startswith("/api") else response.text())

    async def metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """`/metrics` as {"name{labels}": value}, labels sorted (parsed once per read)."""
        return parse_metrics(await self.get(session, "/metrics"))


def proc_stats(pid: int) -> dict[str, float]:
    """CPU seconds a replica used, and seconds it waited for a CPU others held."""
    return {"cpu_s": proc_cpu_s(pid), "wait_s": runqueue_wait_s(pid)}


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if "{" in series:
            name, inner = series.split("{", 1)
            labels = ",".join(sorted(p for p in inner.rstrip("}").split(",") if p))
            series = f"{name}{{{labels}}}"
        out[series] = float(value)
    return out


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of `name` whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    found = 0.0
    for series, value in samples.items():
        base, _, inner = series.partition("{")
        if base == name and all(w in inner.rstrip("}").split(",") for w in want):
            found += value
    return found


def histogram(samples: dict[str, float], name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) buckets of an unlabelled histogram."""
    buckets = []
    for series, value in samples.items():
        if series.startswith(f"{name}_bucket{{"):
            le = series.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), value))
    return sorted(buckets)


async def until(check: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll `check()` until it returns something true; a RuntimeError past `timeout`."""
    loop = asyncio.get_running_loop()
    deadline, last = loop.time() + timeout, None
    while loop.time() < deadline:
        try:
            last = await check()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(every)
    raise RuntimeError(f"not within {timeout:.0f} s: {what} (last: {last!r})")


# -- the system under watch's callbacks -------------------------------------------------------

EMITTER = web.AppKey("emitter", dict)


@contextlib.asynccontextmanager
async def emitter() -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """An HTTP server taking `POST /emit {"ref", "url"}` (202 at once) and then sending
    `{"ref"}` to `url`, while `state["on"]`; `state` counts deliveries answered 2xx and not."""
    state: dict[str, Any] = {"on": False, "sent": 0, "failed": 0}
    sends: set[asyncio.Task[None]] = set()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def deliver(url: str, ref: str) -> None:
        try:
            async with session.post(url, json={"ref": ref}) as response:
                state["sent" if response.status < 300 else "failed"] += 1
        except (aiohttp.ClientError, TimeoutError):
            state["failed"] += 1  # a replica that is gone

    async def emit(request: web.Request) -> web.Response:
        body = await request.json()
        if state["on"]:
            task = asyncio.create_task(deliver(body["url"], body["ref"]))
            sends.add(task)
            task.add_done_callback(sends.discard)
        return web.json_response({"queued": True}, status=202)

    app = web.Application()
    app.router.add_post("/emit", emit)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port, state
    finally:
        state["on"] = False
        if sends:
            await asyncio.wait(set(sends), timeout=6)
        await runner.cleanup()
        await session.close()


# -- flow files -------------------------------------------------------------------------------


def cluster_settings(bootstrap: str, group: str, partitions: int, session_s: float) -> str:
    return (
        f"  cluster: {{bootstrap_servers: '{bootstrap}', group: {group}, "
        f"partitions: {partitions}, session_timeout: {session_s}s}}"
    )


def http_flow(name: str, url: str, interval: float) -> list[str]:
    return [
        f"  - {{name: {name}, interval: {interval}s, timeout: 2s, "
        f"steps: [{{name: get, kind: http, url: '{url}'}}]}}"
    ]


def webhook_flow(name: str, emit_url: str, hook_base: str, interval: float) -> list[str]:
    """An http step asking the emitter to call back, and the callback awaited (within 2 s)."""
    return [
        f"  - name: {name}",
        f"    interval: {interval}s",
        "    timeout: 3s",
        "    steps:",
        f"      - {{name: emit, kind: http, method: POST, url: '{emit_url}', json: "
        f"{{ref: '{{{{ run.correlation }}}}', url: '{hook_base}/hooks/{name}'}}}}",
        f"      - {{name: hook, kind: webhook_await, path: /hooks/{name}, within: 2s, "
        "match: {json: {'$.ref': '{{ run.correlation }}'}}}",
    ]
