"""The cluster's parts on their own: ownership by partition and channel, the assignor's plan and
view, arrivals on the wire, and a scheduler giving flows up (runs aborted, gauges removed)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from aiokafka.partitioner import DefaultPartitioner
from multidict import CIMultiDict, istr

from monitor.cluster.assignor import FlowAssignor, plan
from monitor.cluster.ownership import Ownership, ownership_keys, partition_of
from monitor.cluster.wire import Refusal, decode_arrival, encode_arrival, encode_refusal
from monitor.config import Config
from monitor.demo.broker import free_port
from probes.arrivals import Arrival
from probes.xml_checks import parse_xml, xpath_get
from tests.fixtures.core import serve
from tests.test_http import STARTED, target_app
from tests.test_scheduler import Collect, start

FLOWS = """
kafka:
  clusters: {main: {bootstrap_servers: "127.0.0.1:9"}}
flows:
  - name: alone
    steps: [{name: a, kind: http, url: "http://127.0.0.1:9/"}]
  - name: hook-a
    steps:
      - {name: w, kind: webhook_await, path: /hooks/shared, within: 1s}
  - name: hook-b
    steps:
      - {name: w, kind: webhook_await, path: /hooks/shared, within: 1s}
      - {name: k, kind: kafka_consume, cluster: main, topic: orders, within: 1s}
  - name: consumer-c
    steps:
      - {name: k, kind: kafka_consume, cluster: main, topic: orders, within: 1s}
  - name: own-hook
    steps:
      - {name: w, kind: webhook_await, path: /hooks/own, within: 1s}
"""


@pytest.mark.parametrize("key", ["checkout", "order_via_kafka", "ü-flow", "x" * 300])
def test_a_flow_lands_where_kafka_would_put_a_record_keyed_by_it(key: str) -> None:
    partitions = list(range(32))
    assert partition_of(key, 32) == DefaultPartitioner()(key.encode(), partitions, partitions)


def test_flows_sharing_a_channel_are_owned_together(load_flows: Callable[[str], Config]) -> None:
    flows = load_flows(FLOWS).flows
    keys = ownership_keys(flows)
    # hook-a and hook-b share a path; hook-b and consumer-c a topic: one owner for all three.
    assert keys == {
        "alone": "alone",
        "hook-a": "consumer-c",
        "hook-b": "consumer-c",
        "consumer-c": "consumer-c",
        "own-hook": "own-hook",
    }
    owner = Ownership(flows, 8)
    assert owner.of_channel == {
        "/hooks/shared": partition_of("consumer-c", 8),
        "main/orders": partition_of("consumer-c", 8),
        "/hooks/own": partition_of("own-hook", 8),
    }
    every = owner.flows_in(range(8))
    assert [f.name for f in every] == ["alone", "hook-a", "hook-b", "consumer-c", "own-hook"]
    assert "own-hook" in [f.name for f in owner.flows_in([owner.of_flow["own-hook"]])]
    assert "hook-a" not in [
        f.name for f in owner.flows_in(set(range(8)) - {owner.of_flow["hook-b"]})
    ]


@pytest.mark.parametrize(
    ("members", "partitions", "want"),
    [
        (1, 4, [[0, 1, 2, 3]]),
        (3, 8, [[0, 1, 2], [3, 4, 5], [6, 7]]),
        (4, 2, [[0], [1], [], []]),
    ],
)
def test_plan_gives_balanced_contiguous_ranges(
    members: int, partitions: int, want: list[list[int]]
) -> None:
    assert plan([f"m{i}" for i in range(members)], list(range(partitions))) == want


def test_plan_is_sticky_when_members_come_and_go() -> None:
    parts = list(range(12))
    before = dict(zip(["r1", "r2", "r3"], plan(["r1", "r2", "r3"], parts), strict=True))
    # r2 leaves: r1 and r3 keep all they had and share out r2's partitions.
    after = dict(zip(["r1", "r3"], plan(["r1", "r3"], parts, before), strict=True))
    assert set(before["r1"]) <= set(after["r1"]) and set(before["r3"]) <= set(after["r3"])
    assert sorted(after["r1"] + after["r3"]) == parts and len(after["r1"]) == 6
    # r4 joins: it takes 3 partitions, and only 3 partitions move in all.
    joined = dict(zip(["r1", "r3", "r4"], plan(["r1", "r3", "r4"], parts, after), strict=True))
    moved = sum(len(set(after[r]) - set(joined[r])) for r in ("r1", "r3"))
    assert (len(joined["r4"]), moved) == (4, 4)
    assert sorted(p for part in joined.values() for p in part) == parts


def test_the_assignor_tells_every_member_who_owns_what() -> None:
    assignors = {name: FlowAssignor(name, f"d-{name}", "ctl") for name in ("r2", "r1", "r3")}
    members = {
        f"member-{i}": assignor.metadata(["ctl"]) for i, assignor in enumerate(assignors.values())
    }
    assert all(isinstance(m, ConsumerProtocolMemberMetadata) for m in members.values())
    cluster: Any = SimpleNamespace(partitions_for_topic=lambda topic: set(range(7)))
    plans = assignors["r1"].assign(cluster, members)  # r1 happens to lead
    by_member = {m: [tp.partition for tp in plans[m].partitions()] for m in members}
    got = {json.loads(members[m].user_data)["replica"]: by_member[m] for m in members}
    assert got == {"r1": [0, 1, 2], "r2": [3, 4], "r3": [5, 6]}
    for member_id, assignor in zip(members, assignors.values(), strict=True):
        assignor.on_assignment(plans[member_id])
    for assignor in assignors.values():
        view = {(m.replica, m.digest, m.partitions) for m in assignor.view.members}
        assert view == {("r1", "d-r1", (0, 1, 2)), ("r2", "d-r2", (3, 4)), ("r3", "d-r3", (5, 6))}


def test_an_arrival_crosses_the_control_topic_as_it_was_received() -> None:
    # As aiohttp hands them over: names are `istr`, which a Kafka record header refuses.
    headers = CIMultiDict(
        [(istr("Content-Type"), "application/json"), (istr("webhook-id"), "msg_1")]
    )
    arrival = Arrival(
        source="webhook",
        channel="/hooks/own",
        received_at=0.0,
        received_unix=1_700_000_000.5,
        headers=headers,
        body=b'{"ref": "hw-1"}',
        json={"ref": "hw-1"},
        delivery_id="msg_1",
        meta={"remote": "127.0.0.1", "sender_timestamp": 1_700_000_000},
    )
    value, record_headers = encode_arrival(arrival, "r1")
    assert all(type(name) is str for name, _ in record_headers)  # what aiokafka's encoder takes
    back = decode_arrival(value, record_headers)
    assert back is not None
    assert (back.source, back.channel, back.body, back.json) == (
        "webhook", "/hooks/own", b'{"ref": "hw-1"}', {"ref": "hw-1"}
    )  # fmt: skip
    assert (back.received_unix, back.delivery_id) == (1_700_000_000.5, "msg_1")
    assert back.headers["content-type"] == "application/json"  # names stay case-insensitive
    assert back.meta == {"remote": "127.0.0.1", "sender_timestamp": 1_700_000_000,
                         "forwarded_by": "r1"}  # fmt: skip


def test_an_xml_arrival_crosses_the_control_topic_parsed_again() -> None:
    """Its body is XML, not JSON: the owner parses it as XML (it used to drop it)."""
    body = b'<n:Shipped xmlns:n="urn:n"><n:Ref>hw-1</n:Ref></n:Shipped>'
    arrival = Arrival(
        source="webhook",
        channel="/hooks/soap",
        received_at=0.0,
        received_unix=1_700_000_000.5,
        headers=CIMultiDict([(istr("Content-Type"), "text/xml")]),
        body=body,
        json=None,
        delivery_id=None,
        xml=parse_xml(body),
    )
    back = decode_arrival(*encode_arrival(arrival, "r1"))
    assert isinstance(back, Arrival) and back.json is None
    assert xpath_get(back.xml, "//n:Ref", {"n": "urn:n"}) == ["hw-1"]


@pytest.mark.parametrize(
    "headers",
    [[], [("hopwatch-arrival", b"not json")], [("hopwatch-arrival", b'{"source": "ftp"}')]],
)
def test_a_record_that_is_no_arrival_is_refused(headers: list[tuple[str, bytes]]) -> None:
    assert decode_arrival(b"{}", headers) is None


@pytest.fixture
async def target() -> AsyncIterator[TestServer]:
    server = await serve(target_app())
    yield server
    await server.close()


async def test_giving_flows_up_aborts_their_runs_and_removes_their_gauges(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    base = f"http://127.0.0.1:{target.port}"
    config = load_flows(
        "flows:\n"
        f"  - {{name: stuck, interval: 10s, timeout: 20s, steps: [{{name: s, kind: http, "
        f"url: '{base}/hang'}}]}}\n"
        f"  - {{name: quick, interval: 100ms, timeout: 1s, jitter: 0s, steps: [{{name: s, "
        f"kind: http, url: '{base}/json'}}]}}\n"
    )
    sink = Collect()
    engine = await start(config, sink)
    try:
        scheduler = engine.scheduler
        assert scheduler is not None
        await asyncio.wait_for(target.app[STARTED].wait(), 5)
        await sink.wait_for("quick", 2)
        registry = engine.registry
        labels = {"flow": "quick", "variant": "default", "location": "local"}
        assert registry.get_sample_value("hopwatch_flow_up", labels) == 1.0
        await asyncio.wait_for(engine.release_flows(list(config.flows)), 5)
        [stuck] = sink.of("stuck")
        assert stuck.outcome == "aborted"
        assert registry.get_sample_value("hopwatch_flow_up", labels) is None
        link = {**labels, "step": "s"}
        assert registry.get_sample_value("hopwatch_link_up", link) is None
        assert registry.get_sample_value("hopwatch_runs_total", {**labels, "outcome": "success"})
        count = len(sink.results)
        assert scheduler.waiting == 0
        scheduler.add([config.flow("quick")])  # taken back: on its grid, within one interval
        await sink.wait_for("quick", len(sink.of("quick")) + 1, timeout=2.0)
        assert len(sink.results) > count
        assert registry.get_sample_value("hopwatch_flow_up", labels) == 1.0
    finally:
        await engine.stop()


async def _hopwatch(*args: str, **env: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "monitor", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "300", **env},
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--cluster", "127.0.0.1:9", "--store", "{tmp}/h.db"],
         "a cluster needs a shared store, not '{tmp}/h.db': give --store postgresql+asyncpg://"),
        (["--replica", "r1", "--store", "none"],
         "--cluster-group and --replica need --cluster (or settings.cluster)"),
    ],
)  # fmt: skip
async def test_run_refuses_a_cluster_it_cannot_be(
    args: list[str], want: str, write_flows: Callable[[str], Path], tmp_path: Path
) -> None:
    flows = write_flows(
        "flows:\n  - {name: a, steps: [{name: s, kind: http, url: 'http://127.0.0.1:9/'}]}\n"
    )
    admin = ["--admin-listen", f"127.0.0.1:{free_port()}"]
    code, err = await _hopwatch(
        "run", str(flows), *admin, *(a.replace("{tmp}", str(tmp_path)) for a in args)
    )
    assert code == 2
    assert want.replace("{tmp}", str(tmp_path)) in err


async def test_the_store_url_may_come_from_the_environment(
    write_flows: Callable[[str], Path], tmp_path: Path
) -> None:
    """HOPWATCH_STORE keeps a URL with a password out of the command line (a pod's args)."""
    flows = write_flows(
        "flows:\n  - {name: a, steps: [{name: s, kind: http, url: 'http://127.0.0.1:9/'}]}\n"
    )
    admin = ["--admin-listen", f"127.0.0.1:{free_port()}"]
    code, err = await _hopwatch(
        "run", str(flows), *admin, "--cluster", "127.0.0.1:9", HOPWATCH_STORE=str(tmp_path / "x.db")
    )
    assert code == 2
    assert f"a cluster needs a shared store, not '{tmp_path / 'x.db'}'" in err


def test_a_refusal_crosses_the_control_topic() -> None:
    value, headers = encode_refusal(Refusal("/hooks/own", "bad signature", True), "r1")
    assert decode_arrival(value, headers) == Refusal("/hooks/own", "bad signature", True)
