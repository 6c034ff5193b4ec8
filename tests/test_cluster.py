"""Three real `hopwatch run --cluster` processes on the real broker and PostgreSQL: the flows are
shared out, webhooks all sent to one replica match runs owned by the others and are counted
once, a replica killed with SIGKILL and one stopped with SIGTERM hand their flows over, and no
flow ever has two runs in flight at once (read from the shared store's start/finish times)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from monitor.cluster.ownership import partition_of
from monitor.demo.broker import TansuBroker, free_port

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

PARTITIONS = 12
SESSION_TIMEOUT = 6.0  # the default: the flow file leaves it out, so the handovers test it
INTERVAL = 0.5
# Tansu answers a JoinGroup once half the group's session timeout has passed since it came,
# checked each whole second; a follower's SyncGroup that came before the leader's is answered
# at its next whole second (the `join` and `sync` loops of its group coordinator).
JOIN_HOLD = math.ceil(SESSION_TIMEOUT / 2)
SYNC_POLL = 1.0
HEARTBEAT = SESSION_TIMEOUT / 10  # when a member hears of a rebalance: its next heartbeat
SLACK = 1.5  # two shared cores
EMITTING = web.AppKey("emitting", dict)


# -- the system under watch: answers, and sends webhooks where it is told -----------------------


def _target_app() -> web.Application:
    app = web.Application()
    app[EMITTING] = {"on": False, "sent": 0}
    sends: set[asyncio.Task[None]] = set()

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def emit(request: web.Request) -> web.Response:
        body = await request.json()
        if app[EMITTING]["on"]:
            task = asyncio.create_task(_send(body["url"], {"ref": body["ref"]}))
            sends.add(task)
            task.add_done_callback(sends.discard)
            app[EMITTING]["sent"] += 1
        return web.json_response({"queued": True}, status=202)

    app.router.add_get("/ok", ok)
    app.router.add_post("/emit", emit)
    return app


async def _send(url: str, doc: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(url, json=doc, timeout=aiohttp.ClientTimeout(total=5)):
                pass
        except (aiohttp.ClientError, TimeoutError):
            pass  # a replica that is gone: its runs fail, which the test does not look at


@pytest.fixture
async def target() -> AsyncIterator[TestServer]:
    server = TestServer(_target_app(), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


# -- the replicas ---------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    flows: Path
    store: str
    log: Path
    listen: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "monitor", "run", str(self.flows), "--replica", self.name,
            "--store", self.store, "--listen", f"127.0.0.1:{self.listen}",
            "--admin-listen", f"127.0.0.1:{self.admin}", "--grace", "1",
            stdout=asyncio.subprocess.DEVNULL, stderr=self.log.open("wb"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

    async def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.admin}{path}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            response.raise_for_status()
            return await (response.json() if path.startswith("/api") else response.text())

    async def sample(self, name: str, labels: dict[str, str]) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in (await self.get("/metrics")).splitlines():
            if line.split("{", 1)[0].split(" ", 1)[0] == name and _labels(line) == want:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def _labels(line: str) -> str:
    if "{" not in line:
        return ""
    inner = line[line.index("{") + 1 : line.index("}")]
    return ",".join(sorted(part for part in inner.split(",") if part))


async def eventually(check: Any, timeout: float, what: str) -> Any:
    """Poll `check()` (an awaitable factory) until it returns something true, or fail."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except (aiohttp.ClientError, OSError):
            last = None
        if last:
            return last
        await asyncio.sleep(0.2)
    pytest.fail(f"not within {timeout}s: {what} (last: {last!r})")


def _names(prefix: str, per_member: int, members: int) -> list[str]:
    """Flow names spread over the members' partition ranges (members sorted by name get
    contiguous ranges of PARTITIONS), `per_member` each."""
    size = PARTITIONS // members
    found: dict[int, list[str]] = {m: [] for m in range(members)}
    n = 0
    while any(len(v) < per_member for v in found.values()):
        name = f"{prefix}-{n}"
        member = partition_of(name, PARTITIONS) // size
        if len(found[member]) < per_member:
            found[member].append(name)
        n += 1
    return [name for names in found.values() for name in names]


def _flow_file(tmp: Path, bootstrap: str, group: str, target: int, hooks_at: int) -> Path:
    base = f"http://127.0.0.1:{target}"
    lines = [
        "settings:",
        f"  cluster: {{bootstrap_servers: '{bootstrap}', group: {group}, "
        f"partitions: {PARTITIONS}}}",
        f"kafka: {{clusters: {{main: {{bootstrap_servers: '{bootstrap}'}}}}}}",
        "flows:",
    ]
    for name in _names("topic", 1, 3):  # each on a topic of its own, read by its owner only
        lines += [
            f"  - name: {name}",
            f"    interval: {INTERVAL}s",
            "    timeout: 3s",
            "    steps:",
            f"      - {{name: send, kind: kafka_produce, cluster: main, topic: {group}-{name}, "
            "value: {ref: '{{ run.correlation }}'}}",
            f"      - {{name: see, kind: kafka_consume, cluster: main, topic: {group}-{name}, "
            "within: 2s, match: {json: {'$.ref': '{{ run.correlation }}'}}}",
        ]
    for name in _names("plain", 3, 3):
        lines += [
            f"  - name: {name}",
            f"    interval: {INTERVAL}s",
            "    timeout: 2s",
            f"    steps: [{{name: get, kind: http, url: '{base}/ok'}}]",
        ]
    for name in _names("hook", 2, 3):
        lines += [
            f"  - name: {name}",
            f"    interval: {INTERVAL}s",
            "    timeout: 3s",
            "    steps:",
            f"      - {{name: emit, kind: http, method: POST, url: '{base}/emit', json: "
            f"{{ref: '{{{{ run.correlation }}}}', url: 'http://127.0.0.1:{hooks_at}/hooks/{name}'}}}}",
            f"      - {{name: hook, kind: webhook_await, path: /hooks/{name}, within: 2s, "
            "match: {json: {'$.ref': '{{ run.correlation }}'}}}",
        ]
    path = tmp / "cluster.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _runs(pg: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg.replace("postgresql+asyncpg", "postgresql"))
    try:
        return list(
            await conn.fetch(
                "SELECT id, flow, replica, outcome, reason, started_at, finished_at FROM runs "
                "ORDER BY flow, started_at"
            )
        )
    finally:
        await conn.close()


async def _members(replica: Replica, count: int, flows: int) -> dict[str, list[str]] | None:
    view = await replica.get("/api/v1/cluster")
    members = {m["replica"]: m["flows"] for m in view["members"]}
    owned = [f for names in members.values() for f in names]
    if len(members) == count and len(owned) == flows and len(set(owned)) == flows:
        return members
    return None


async def test_three_replicas_share_flows_forward_webhooks_and_hand_over(
    tmp_path: Path, kafka_broker: TansuBroker, pg_url: str, target: TestServer
) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    replicas = [
        Replica(f"r{i}", tmp_path / "cluster.yaml", pg_url, tmp_path / f"r{i}.log")
        for i in (1, 2, 3)
    ]
    r1, r2, r3 = replicas
    _flow_file(tmp_path, kafka_broker.bootstrap, group, target.port, r1.listen)
    flows = 18
    try:
        await r1.start()  # the first one migrates the shared store alone
        await eventually(lambda: r1.get("/readyz"), 30, "r1 ready")
        await r2.start()
        await r3.start()

        # 1. Every flow owned by exactly one replica, and all agree on who owns what.
        members = await eventually(lambda: _members(r1, 3, flows), 40, "three members")
        for other in (r2, r3):
            assert await eventually(lambda o=other: _members(o, 3, flows), 10, "agreement")
        assert all(len(names) == 6 for names in members.values()), members
        owned = [await r.sample("hopwatch_cluster_owned_flows", {}) for r in replicas]
        assert owned == [6.0, 6.0, 6.0]

        # 2. Webhooks all go to r1; runs on r2 and r3 still get theirs, counted once.
        target.app[EMITTING]["on"] = True
        hooks_elsewhere = [f for r in ("r2", "r3") for f in members[r] if f.startswith("hook")]
        assert len(hooks_elsewhere) == 4
        topic_flows = [f for names in members.values() for f in names if f.startswith("topic")]

        async def hooks_passed() -> bool:
            runs = await _runs(pg_url)
            good = {r["flow"] for r in runs if r["outcome"] == "success"}
            return set(hooks_elsewhere) | set(topic_flows) <= good

        await eventually(hooks_passed, 20, "webhook flows on r2 and r3, and Kafka flows, passing")
        target.app[EMITTING]["on"] = False
        await asyncio.sleep(2.5)  # the last deliveries land or their waits end (within: 2s)
        stopped_at = time.time()
        matched = unmatched = 0.0
        for r in replicas:
            labels = {"source": "webhook"}
            matched += await r.sample("hopwatch_arrivals_total", labels | {"outcome": "matched"})
            # Webhooks only: the Kafka flows ran through the rebalances of the start, and the
            # records of runs those aborted are counted unmatched where they were read.
            for outcome in ("unmatched", "duplicate", "late"):
                count = labels | {"outcome": outcome}
                unmatched += await r.sample("hopwatch_arrivals_total", count)
        assert unmatched == 0
        assert matched == target.app[EMITTING]["sent"] > 0
        forwarded = await r1.sample(
            "hopwatch_cluster_forwarded_arrivals_total", {"outcome": "sent"}
        )
        assert forwarded > 0
        # Forwarding adds milliseconds, not a fetch wait (aiokafka's 500 ms default: 100-250 ms).
        delay = "hopwatch_cluster_forward_delay_seconds"
        fast = [await r.sample(f"{delay}_bucket", {"le": "0.025"}) for r in (r2, r3)]
        taken = [await r.sample(f"{delay}_count", {}) for r in (r2, r3)]
        assert sum(taken) > 0 and sum(fast) >= 0.5 * sum(taken), (fast, taken)

        # A delivery refused at r1 for a run waiting on r2 tells that run why (a wrong content
        # type here; a rotated secret alike), instead of leaving it to say not_received.
        hook = next(f for f in members["r2"] if f.startswith("hook"))
        url = f"http://127.0.0.1:{r1.listen}/hooks/{hook}"

        async def told() -> bool:
            plain = {"Content-Type": "text/plain"}
            async with aiohttp.ClientSession() as session, session.post(url, headers=plain):
                pass
            return any(
                r["flow"] == hook and r["reason"] == "assertion" for r in await _runs(pg_url)
            )

        await eventually(told, 20, f"{hook} on r2 failing assertion for a refusal at r1")
        target.app[EMITTING]["on"] = True

        # 3. SIGKILL r3: its flows run again elsewhere within the (default) session timeout,
        # Tansu's rebalance and an interval.
        r3_flows = set(members["r3"])
        killed = time.time()
        r3.signal(signal.SIGKILL)
        await eventually(lambda: _members(r1, 2, flows), 30, "two members after SIGKILL")

        async def resumed(moved: set[str], since: float) -> float | None:
            runs = await _runs(pg_url)
            first: dict[str, float] = {}
            for run in runs:
                if run["flow"] in moved and run["started_at"] > since and run["replica"] != "r3":
                    first.setdefault(run["flow"], run["started_at"])
            return max(first.values()) - since if len(first) == len(moved) else None

        gap = await eventually(lambda: resumed(r3_flows, killed), 20, "r3's flows resumed")
        assert gap <= SESSION_TIMEOUT + HEARTBEAT + JOIN_HOLD + SYNC_POLL + INTERVAL + SLACK

        # 4. SIGTERM r2: it gives its flows up and leaves the group at once.
        view = await r1.get("/api/v1/cluster")
        r2_flows = {f for m in view["members"] if m["replica"] == "r2" for f in m["flows"]}
        termed = time.time()
        r2.signal(signal.SIGTERM)
        assert await asyncio.wait_for(r2.proc.wait(), 15) == 0  # type: ignore[union-attr]
        await eventually(lambda: _members(r1, 1, flows), 20, "r1 alone after SIGTERM")
        gap = await eventually(lambda: resumed(r2_flows, termed), 20, "r2's flows resumed")
        assert gap <= HEARTBEAT + JOIN_HOLD + INTERVAL + SLACK
    finally:
        for r in replicas:
            await r.stop()

    # 5. Never two runs of one flow in flight at once, over the whole test, from the store.
    runs = await _runs(pg_url)
    assert {r["replica"] for r in runs} == {"r1", "r2", "r3"}
    by_flow: dict[str, list[asyncpg.Record]] = {}
    for run in runs:
        by_flow.setdefault(run["flow"], []).append(run)
    for flow, ordered in by_flow.items():
        for earlier, later in itertools.pairwise(ordered):
            assert earlier["finished_at"] <= later["started_at"] + 0.001, (flow, earlier, later)
    passed_hooks = [
        r for r in runs
        if r["flow"].startswith("hook") and r["outcome"] == "success"
        and r["finished_at"] < stopped_at
    ]  # fmt: skip
    assert len(passed_hooks) == matched, json.dumps([dict(r) for r in passed_hooks][:3])
