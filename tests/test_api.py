"""The /api/v1 routes over a real store and a real aiohttp server, and their OpenAPI document."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from monitor.admin import build_admin_app
from monitor.api import install_api_routes, openapi_document
from monitor.results import RunResult
from monitor.status_page import install_status_routes
from monitor.store import Store
from tests.fixtures.store import T0, flow_stub, make_run

Client = TestClient[web.Request, web.Application]
FLOWS = [
    flow_stub("checkout", ["create_order", "read_back"], ["stable", "canary"]),
    flow_stub("via_kafka", ["command", "confirmation"]),
]


def _api_app(store: Store | None, last_runs: dict[tuple[str, str], RunResult]) -> web.Application:
    app = web.Application()
    install_api_routes(app, store=store, flows=FLOWS, last_runs=last_runs, bearer_auth=False)
    return app


@pytest.fixture
async def last_runs() -> dict[tuple[str, str], RunResult]:
    return {}


@pytest.fixture
async def client(
    store: Store, last_runs: dict[tuple[str, str], RunResult]
) -> AsyncIterator[Client]:
    async with TestClient(TestServer(_api_app(store, last_runs), host="127.0.0.1")) as c:
        yield c


def _validator(document: dict[str, Any], model: str) -> jsonschema.protocols.Validator:
    """A validator for one component schema, resolving $refs inside the document."""
    registry: Registry[Any] = Registry().with_resource(
        "urn:doc", DRAFT202012.create_resource(document)
    )
    schema = {"$ref": f"urn:doc#/components/schemas/{model}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


async def _get(client: Client, path: str, model: str, status: int = 200) -> Any:
    resp = await client.get(path)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    _validator(openapi_document(), model).validate(body)
    return body


async def test_runs_filter_paginate_and_validate_against_the_document(
    client: Client, store: Store
) -> None:
    for i in range(7):
        store.submit(
            make_run(
                run_id=f"r{i}",
                variant="canary" if i % 2 else "stable",
                started_at=T0 + i,
                fail_at="read_back" if i == 3 else None,
            )
        )
    assert await store.flush()

    page = await _get(client, "/api/v1/runs?limit=3", "RunPage")
    assert [r["run_id"] for r in page["runs"]] == ["r6", "r5", "r4"]
    nxt = await _get(client, f"/api/v1/runs?limit=3&cursor={page['next_cursor']}", "RunPage")
    assert [r["run_id"] for r in nxt["runs"]] == ["r3", "r2", "r1"]

    failed = await _get(client, "/api/v1/runs?outcome=failure&variant=canary", "RunPage")
    assert [(r["run_id"], r["broken_step"], r["reason"]) for r in failed["runs"]] == [
        ("r3", "read_back", "http_status")
    ]
    window = await _get(client, f"/api/v1/runs?since={T0 + 2}&until={T0 + 4}", "RunPage")
    assert [r["run_id"] for r in window["runs"]] == ["r3", "r2"]
    assert (await _get(client, "/api/v1/runs?flow=nope", "RunPage"))["runs"] == []


async def test_run_detail_has_hops_timings_reasons_and_trace_id(
    client: Client, store: Store
) -> None:
    store.submit(make_run(run_id="x1", fail_at="read_back", trace_id="0af7" * 8, excerpt="<b>503"))
    assert await store.flush()
    run = await _get(client, "/api/v1/runs/x1", "RunDetail")
    assert run["trace_id"] == "0af7" * 8
    hop = run["steps"][1]
    assert (hop["name"], hop["status"], hop["reason"], hop["excerpt"]) == (
        "read_back",
        "failed",
        "http_status",
        "<b>503",
    )
    assert set(hop["phases"]) == {"dns", "connect", "processing", "transfer"}
    missing = await _get(client, "/api/v1/runs/nope", "ErrorBody", status=404)
    assert "nope" in missing["error"]


async def test_runs_name_the_replica_that_ran_them(
    client: Client, store: Store, last_runs: dict[tuple[str, str], RunResult]
) -> None:
    in_cluster = make_run(run_id="c1", started_at=T0 + 1)
    in_cluster.replica = "hopwatch-7f9c-2"
    store.submit(in_cluster)
    store.submit(make_run(run_id="s1", started_at=T0))  # a single process names no replica
    assert await store.flush()

    page = await _get(client, "/api/v1/runs", "RunPage")
    assert [(r["run_id"], r["replica"]) for r in page["runs"]] == [
        ("c1", "hopwatch-7f9c-2"),
        ("s1", None),
    ]
    assert (await _get(client, "/api/v1/runs/c1", "RunDetail"))["replica"] == "hopwatch-7f9c-2"
    assert (await _get(client, "/api/v1/runs/s1", "RunDetail"))["replica"] is None
    live = make_run(variant="canary")  # the runner's last result, not yet read back
    live.replica = "hopwatch-7f9c-3"
    last_runs[("checkout", "canary")] = live
    flows = {f["name"]: f for f in (await _get(client, "/api/v1/flows", "FlowList"))["flows"]}
    canary = {v["variant"]: v for v in flows["checkout"]["variants"]}["canary"]
    assert canary["last_run"]["replica"] == "hopwatch-7f9c-3"
    summary = openapi_document()["components"]["schemas"]["RunSummary"]
    assert "replica" in summary["required"]  # always present: null, not missing


async def test_incidents_open_then_closed(client: Client, store: Store) -> None:
    store.submit(make_run(run_id="bad", variant="stable", started_at=T0, fail_at="read_back"))
    assert await store.flush()
    opened = await _get(client, "/api/v1/incidents?status=open", "IncidentPage")
    assert [(i["flow"], i["variant"], i["step"], i["status"]) for i in opened["incidents"]] == [
        ("checkout", "stable", "read_back", "open")
    ]
    store.submit(make_run(run_id="good", variant="stable", started_at=T0 + 30))
    assert await store.flush()
    assert (await _get(client, "/api/v1/incidents?status=open", "IncidentPage"))["incidents"] == []
    closed = await _get(client, "/api/v1/incidents?status=closed&flow=checkout", "IncidentPage")
    assert [i["closing_run_id"] for i in closed["incidents"]] == ["good"]


async def test_runs_and_incidents_filter_by_location(client: Client, store: Store) -> None:
    """A link broken from one location of two: each location's runs and incidents apart."""
    for i, location in enumerate(("eu-west-1", "us-east-1")):
        fail_at = "read_back" if location == "eu-west-1" else None
        run = make_run(run_id=f"r{i}", location=location, started_at=T0 + i, fail_at=fail_at)
        store.submit(run)
    assert await store.flush()
    for location, runs, incidents in (("eu-west-1", ["r0"], 1), ("us-east-1", ["r1"], 0)):
        page = await _get(client, f"/api/v1/runs?location={location}", "RunPage")
        assert [r["run_id"] for r in page["runs"]] == runs
        found = await _get(client, f"/api/v1/incidents?location={location}", "IncidentPage")
        assert [i["location"] for i in found["incidents"]] == [location] * incidents
    everywhere = await _get(client, "/api/v1/incidents", "IncidentPage")
    assert len(everywhere["incidents"]) == 1
    nowhere = await _get(client, "/api/v1/incidents?location=mars", "IncidentPage")
    assert nowhere["incidents"] == []


async def test_flows_show_current_link_states(
    client: Client,
    store: Store,
    last_runs: dict[tuple[str, str], RunResult],
) -> None:
    last_runs[("checkout", "canary")] = make_run(variant="canary", fail_at="read_back")
    stored = make_run(flow="via_kafka", steps=["command", "confirmation"], started_at=T0)
    store.submit(stored)  # not in memory (e.g. after a restart): read from the store
    assert await store.flush()

    body = await _get(client, "/api/v1/flows", "FlowList")
    flows = {f["name"]: f for f in body["flows"]}
    variants = {v["variant"]: v for v in flows["checkout"]["variants"]}
    assert [link["status"] for link in variants["canary"]["links"]] == ["passed", "failed"]
    assert variants["canary"]["outcome"] == "failure"
    assert variants["stable"]["outcome"] == "unknown"
    assert [link["status"] for link in variants["stable"]["links"]] == ["unknown", "unknown"]
    (kafka,) = flows["via_kafka"]["variants"]
    assert kafka["last_run"]["run_id"] == stored.run_id
    assert [link["status"] for link in kafka["links"]] == ["passed", "passed"]


BAD_QUERIES = [
    "limit=0",
    "limit=501",
    "limit=abc",
    "limit=1.5",
    "limit=5%0A",
    "since=yesterday",
    "since=nan",
    "until=1e999",
    "outcome=broken",
    "cursor=%25%25",
    "cursor=x~run-1",
    "cursor=1~a%0A",
]


async def test_bad_parameters_are_400_with_a_reason(client: Client) -> None:
    for query in BAD_QUERIES:
        body = await _get(client, f"/api/v1/runs?{query}", "ErrorBody", status=400)
        assert body["error"], query
    bad_status = await _get(client, "/api/v1/incidents?status=broken", "ErrorBody", status=400)
    assert "status" in bad_status["error"]


async def test_a_hand_made_cursor_is_a_position(client: Client, store: Store) -> None:
    for i in range(3):
        store.submit(make_run(run_id=f"r{i}", started_at=T0 + i))
    assert await store.flush()
    page = await _get(client, f"/api/v1/runs?cursor={T0 + 2}~", "RunPage")
    assert [r["run_id"] for r in page["runs"]] == ["r1", "r0"]


async def test_without_a_store_history_routes_say_so() -> None:
    app = _api_app(None, {("checkout", "stable"): make_run(variant="stable")})
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        for path in ("/api/v1/runs", "/api/v1/runs/x", "/api/v1/incidents"):
            body = await _get(client, path, "ErrorBody", status=503)
            assert "no store" in body["error"]
        flows = await _get(client, "/api/v1/flows", "FlowList")
        assert flows["flows"][0]["variants"][0]["outcome"] == "success"


def test_document_is_valid_openapi_and_describes_auth() -> None:
    with_token = openapi_document(bearer_auth=True)
    schema = schemathesis.openapi.from_dict(with_token)
    operations = [result.ok() for result in schema.get_all_operations()]  # raises if malformed
    assert {op.path for op in operations} == {
        "/api/v1/flows",
        "/api/v1/runs",
        "/api/v1/runs/{run_id}",
        "/api/v1/incidents",
        "/api/v1/cluster",
        "/api/v1/openapi.json",
        "/api/v1/maintenance",
        "/api/v1/maintenance/{window_id}",
        "/healthz",
        "/readyz",
    }
    assert with_token["security"] == [{"bearerAuth": []}]
    assert with_token["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert with_token["paths"]["/healthz"]["get"]["security"] == []
    assert "401" in with_token["paths"]["/api/v1/runs"]["get"]["responses"]
    loopback = openapi_document(bearer_auth=False)
    assert "security" not in loopback
    assert "bearerAuth" in loopback["components"]["securitySchemes"]


async def test_a_replica_alone_answers_the_cluster_view_with_every_flow(client: Client) -> None:
    body = await _get(client, "/api/v1/cluster", "ClusterView")
    assert body["group"] is None
    [member] = body["members"]
    assert member["replica"] == body["replica"]
    assert member["flows"] == sorted(f.name for f in FLOWS)


async def test_document_is_served(client: Client) -> None:
    resp = await client.get("/api/v1/openapi.json")
    assert resp.status == 200
    assert (await resp.json())["openapi"] == "3.1.0"


# --- schemathesis (its command line, a real process) against a real server -------------------

ST = Path(sys.executable).with_name("st")


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _schemathesis(base: str, cwd: Path, *args: str) -> None:
    """Runs `st run` on the served document and fails the test with its report."""
    # A well-formed window can still be refused (unknown flows, an end in the past): 422.
    (cwd / "schemathesis.toml").write_text(
        '[[operations]]\ninclude-operation-id = "addMaintenance"\n'
        'checks.positive_data_acceptance.expected-statuses = ["201", "401", "422"]\n'
    )
    proc = await asyncio.create_subprocess_exec(
        str(ST),
        f"--config-file={cwd / 'schemathesis.toml'}",
        "run",
        f"{base}/api/v1/openapi.json",
        "--checks=all",
        "--phases=examples,coverage,fuzzing",
        "--max-examples=40",
        "--workers=1",
        "--seed=1",
        "--request-timeout=10",
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1"},
    )
    async with asyncio.timeout(300):
        output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode(errors="replace")


async def _fill(store: Store) -> None:
    for i in range(12):
        store.submit(
            make_run(run_id=f"run-{i}", started_at=T0 + i, fail_at="read_back" if i > 9 else None)
        )
    assert await store.flush()


@pytest.mark.skipif(not ST.exists(), reason="schemathesis is not installed (test extra)")
async def test_api_conforms_to_its_document_under_schemathesis(
    store: Store, tmp_path: Path
) -> None:
    await _fill(store)
    runner, base = await _serve(_api_app(store, {}))
    try:
        # /healthz and /readyz are the admin app's; they are checked in the next test.
        await _schemathesis(base, tmp_path, "--include-path-regex=^/api/")
    finally:
        await runner.cleanup()


@pytest.mark.skipif(not ST.exists(), reason="schemathesis is not installed (test extra)")
async def test_admin_app_with_a_token_conforms_to_the_document(
    sqlite_url: str, tmp_path: Path, registry: CollectorRegistry
) -> None:
    """The whole admin listener as the monitor builds it off loopback: token required."""
    store = Store(sqlite_url)
    await store.migrate()
    await _fill(store)
    app = build_admin_app(registry, ready=lambda: True, token="s3cret")
    install_api_routes(app, store=store, flows=FLOWS, last_runs={}, bearer_auth=True)
    install_status_routes(app, store=store, flows=FLOWS, last_runs={})
    runner, base = await _serve(app)
    try:
        # ignored_auth (in --checks=all) also sends requests without the token.
        await _schemathesis(base, tmp_path, "--header=Authorization: Bearer s3cret")
    finally:
        await runner.cleanup()
        await store.close()
