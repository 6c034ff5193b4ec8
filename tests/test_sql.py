"""The sql kind against SQLite, the machine's PostgreSQL and a MariaDB started on loopback."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from monitor.config import Config
from probes.sql import compile_query
from tests.fixtures.core import serve
from tests.fixtures.mariadb import MARIADB_PASSWORD, MariaDb
from tests.fixtures.otlp import OtlpReceiver
from tests.test_http import run_flow

JSON_TYPE = {"sqlite": "TEXT", "postgresql": "JSONB", "mariadb": "JSON"}
DB_PARAMS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.postgres),
    "mariadb",
]


class Db:
    """A database of one backend and a table of this test's own."""

    def __init__(self, backend: str, url: str) -> None:
        self.backend = backend
        self.url = url
        self.table = f"orders_{uuid.uuid4().hex[:10]}"

    async def execute(self, *statements: str, **params: Any) -> list[Any]:
        engine = create_async_engine(self.url)
        try:
            async with engine.begin() as conn:
                rows: list[Any] = []
                for statement in statements:
                    result = await conn.execute(text(statement), params)
                    rows = list(result) if result.returns_rows else []
                return rows
        finally:
            await engine.dispose()

    async def create(self) -> None:
        await self.execute(
            f"CREATE TABLE {self.table} (id INTEGER PRIMARY KEY, ref VARCHAR(64), "
            f"status VARCHAR(16), total DECIMAL(10,2), payload {JSON_TYPE[self.backend]})"
        )

    async def insert(self, id_: int, ref: str, status: str = "paid", total: str = "42.50") -> None:
        payload = json.dumps({"items": [{"sku": "x-1"}], "total": 42.5, "ref": ref})
        await self.execute(
            f"INSERT INTO {self.table} (id, ref, status, total, payload) "
            "VALUES (:id, :ref, :status, :total, :payload)",
            id=id_, ref=ref, status=status, total=total, payload=payload,
        )  # fmt: skip


def backend_url(request: pytest.FixtureRequest, backend: str) -> str:
    """The URL of a database of `backend` (a sync fixture's lookup: async ones cannot)."""
    if backend == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    if backend == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return str(request.getfixturevalue("mariadb").url)


@pytest.fixture(params=DB_PARAMS)
def db_url(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param, backend_url(request, request.param)


@pytest.fixture
async def db(db_url: tuple[str, str]) -> Db:
    database = Db(*db_url)
    await database.create()
    return database


def flow(steps: str, variant: str = "{}") -> str:
    return (
        "flows:\n  - name: f\n    timeout: 8s\n"
        f"    variants: {{stable: {variant}}}\n    steps:\n{steps}"
    )


async def test_row_checked_and_values_extracted_for_a_later_step(
    db: Db, load_flows: Callable[[str], Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    await db.insert(7, "hw-known")
    monkeypatch.setenv("ORDERS_DB", db.url)
    steps = f"""\
      - name: row
        kind: sql
        url: "${{env:ORDERS_DB}}"
        query: "SELECT id, status, total, payload FROM {db.table} WHERE ref = {{{{ variant.ref }}}}"
        expect:
          rows: 1
          columns: {{status: paid, total: 42.5}}
          json: {{payload: {{"$.items[0].sku": x-1, "$.total": 42.5}}}}
        extract:
          id: {{column: id}}
          sku: {{column: payload, json: "$.items[0].sku"}}
      - name: again
        kind: sql
        url: "${{env:ORDERS_DB}}"
        query: "SELECT status FROM {db.table} WHERE id = {{{{ steps.row.id }}}}"
        expect: {{rows: 1, columns: {{status: "{{{{ 'pa' ~ 'id' }}}}"}}}}
"""
    result = await run_flow(load_flows(flow(steps, "{ref: hw-known}")))
    assert [(s.status, s.message) for s in result.steps] == [("passed", None)] * 2
    row = result.steps[0]
    assert row.attributes["db.response.returned_rows"] == 1
    assert row.latency_s is not None and row.latency_s > 0


@pytest.mark.parametrize(
    ("expect", "reason", "message"),
    [
        ("{rows: 2}", "assertion", "1 rows, want 2"),
        ("{columns: {status: refunded}}", "assertion", "column status is 'paid', want 'refunded'"),
        ("{columns: {nope: 1}}", "assertion",
         "no column 'nope' (columns: status, payload), want column nope"),
        ('{json: {payload: {"$.total": 1}}}', "assertion",
         "column payload: $.total is 42.5, want 1"),
        ('{json: {status: {"$.a": 1}}}', "assertion",
         "column status is not JSON: Expecting value at line 1 column 1"),
    ],
)  # fmt: skip
async def test_assertions_say_what_was_seen_and_wanted(
    db: Db, load_flows: Callable[[str], Config], expect: str, reason: str, message: str
) -> None:
    await db.insert(1, "hw-a")
    steps = f"""\
      - name: row
        kind: sql
        url: "{db.url}"
        query: "SELECT status, payload FROM {db.table} WHERE ref = 'hw-a'"
        expect: {expect}
"""
    result = await run_flow(load_flows(flow(steps)))
    [step] = result.steps
    assert (step.status, step.reason, step.message) == ("failed", reason, message)


async def test_extract_failure_names_the_column(
    db: Db, load_flows: Callable[[str], Config]
) -> None:
    steps = f"""\
      - name: row
        kind: sql
        url: "{db.url}"
        query: "SELECT id FROM {db.table}"
        extract: {{id: {{column: id}}}}
"""
    [step] = (await run_flow(load_flows(flow(steps)))).steps
    assert (step.reason, step.message) == ("extract", "id: no rows, want column id")


def order_api(db: Db) -> web.Application:
    """A tiny API whose worker writes the order a moment after answering, as real ones do."""
    app = web.Application()
    tasks: set[asyncio.Task[None]] = set()

    async def create(request: web.Request) -> web.Response:
        body = await request.json()

        async def worker() -> None:
            await asyncio.sleep(0.3)  # the system's own delay: the row lands after the answer
            await db.insert(int(body["id"]), str(body["ref"]))

        task = asyncio.create_task(worker())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return web.json_response({"id": body["id"], "ref": body["ref"]}, status=202)

    app.router.add_post("/orders", create)
    return app


@pytest.fixture
async def api(db: Db) -> AsyncIterator[TestServer]:
    server = await serve(order_api(db))
    yield server
    await server.close()


async def test_polls_until_the_row_the_api_promised_lands(
    db: Db, api: TestServer, load_flows: Callable[[str], Config]
) -> None:
    steps = f"""\
      - name: create
        kind: http
        method: POST
        url: "http://127.0.0.1:{api.port}/orders"
        json: {{id: 11, ref: "{{{{ run.correlation }}}}"}}
        expect: {{status: 202}}
        extract: {{ref: {{json: $.ref}}}}
      - name: landed
        kind: sql
        url: "{db.url}"
        query: "SELECT status FROM {db.table} WHERE ref = {{{{ steps.create.ref }}}}"
        until: {{rows: 1}}
        every: 50ms
        within: 5s
        expect: {{columns: {{status: paid}}}}
"""
    result = await run_flow(load_flows(flow(steps)))
    create, landed = result.steps
    assert create.status == "passed"
    assert (landed.status, landed.message) == ("passed", None)
    assert landed.attributes["attempts"] > 1  # it was not there at first
    assert landed.latency_s is not None and landed.latency_s >= 0.2


async def test_polling_gives_up_with_the_last_assertion(
    db: Db, load_flows: Callable[[str], Config]
) -> None:
    steps = f"""\
      - name: landed
        kind: sql
        url: "{db.url}"
        query: "SELECT 1 FROM {db.table} WHERE ref = {{{{ run.correlation }}}}"
        until: {{rows: 1}}
        every: 50ms
        within: 300ms
"""
    [step] = (await run_flow(load_flows(flow(steps)))).steps
    assert step.reason == "assertion"
    assert step.message is not None and step.message.startswith("0 rows, want 1 (still, after ")


INJECTIONS = ["x' OR '1'='1", "x'; DROP TABLE {table}; --", "x\\' OR 1=1 -- ", ":hw_p0"]


@pytest.mark.parametrize("payload", INJECTIONS)
async def test_extracted_values_are_bound_never_spliced(
    db: Db, load_flows: Callable[[str], Config], payload: str
) -> None:
    """A value taken from a response cannot change the statement: the hostile ref matches no
    row (spliced, the first would match every row), and the table is still there."""
    await db.insert(1, "hw-a")
    await db.insert(2, "hw-b")
    hostile = payload.format(table=db.table)
    app = web.Application()

    async def order(request: web.Request) -> web.Response:
        return web.json_response({"ref": hostile})

    app.router.add_get("/order", order)
    server = await serve(app)
    steps = f"""\
      - name: get
        kind: http
        url: "http://127.0.0.1:{server.port}/order"
        extract: {{ref: {{json: $.ref}}}}
      - name: row
        kind: sql
        url: "{db.url}"
        query: "SELECT ref FROM {db.table} WHERE ref = {{{{ steps.get.ref }}}}"
        expect: {{rows: 0}}
"""
    try:
        result = await run_flow(load_flows(flow(steps)))
    finally:
        await server.close()
    assert [(s.status, s.message) for s in result.steps] == [("passed", None)] * 2
    rows = await db.execute(f"SELECT count(*) FROM {db.table}")
    assert rows[0][0] == 2


def test_expressions_become_binds_and_the_sql_own_colons_stay_text() -> None:
    statement = compile_query("SELECT '12:30', x::text FROM t WHERE a = {{ run.id }} AND b = :c")
    assert statement.sql == ("SELECT '12:30', x::text FROM t WHERE a = :hw_p0 AND b = \\:c")
    assert statement.expressions == (" run.id ",)
    assert list(statement.clause.compile().params) == ["hw_p0"]


@pytest.mark.parametrize(
    "write",
    ["DELETE FROM {table}", "UPDATE {table} SET status = 'gone'"],
)
async def test_the_query_cannot_write(
    db: Db, load_flows: Callable[[str], Config], write: str
) -> None:
    await db.insert(1, "hw-a")
    steps = f"""\
      - name: row
        kind: sql
        url: "{db.url}"
        query: "{write.format(table=db.table)}"
"""
    [step] = (await run_flow(load_flows(flow(steps)))).steps
    assert step.reason == "error"
    assert step.message is not None and step.message.startswith("query failed: ")
    rows = await db.execute(f"SELECT status FROM {db.table}")
    assert [tuple(r) for r in rows] == [("paid",)]


async def test_sql_error_is_named_without_the_password(
    mariadb: MariaDb, load_flows: Callable[[str], Config]
) -> None:
    steps = f"""\
      - name: row
        kind: sql
        url: "{mariadb.url}"
        query: "SELECT nope FROM missing_table_{uuid.uuid4().hex[:8]}"
"""
    [step] = (await run_flow(load_flows(flow(steps)))).steps
    assert step.reason == "error"
    assert step.message is not None and "1146" in step.message and "doesn't exist" in step.message
    assert MARIADB_PASSWORD not in step.message


async def test_wrong_password_is_a_connect_error_that_does_not_show_it(
    mariadb: MariaDb, load_flows: Callable[[str], Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "not-the-pw-" + uuid.uuid4().hex[:6]
    monkeypatch.setenv("BAD_DB", mariadb.url.replace(MARIADB_PASSWORD, wrong))
    steps = """\
      - name: row
        kind: sql
        url: "${env:BAD_DB}"
        query: "SELECT 1"
"""
    [step] = (await run_flow(load_flows(flow(steps)))).steps
    assert step.reason == "connect_error"
    assert step.message is not None
    assert "Access denied" in step.message and "hopwatch:***@127.0.0.1" in step.message
    assert wrong not in step.message


async def test_nothing_listening_is_a_connect_error(
    load_flows: Callable[[str], Config], port: Callable[[], int]
) -> None:
    steps = f"""\
      - name: row
        kind: sql
        url: "postgresql://hopwatch:pw-{uuid.uuid4().hex[:6]}@127.0.0.1:{port()}/test"
        query: "SELECT 1"
"""
    [step] = (await run_flow(load_flows(flow(steps)))).steps
    assert step.reason == "connect_error"
    assert step.message is not None and "hopwatch:***@127.0.0.1" in step.message


@pytest.mark.parametrize(
    ("db_url", "query"),
    [
        pytest.param("postgresql", "SELECT pg_sleep(5)", marks=pytest.mark.postgres),
        ("mariadb", "SELECT SLEEP(5) FROM {table} WHERE ref = 'x' OR 1=1"),
    ],
    indirect=["db_url"],
)
async def test_the_server_stops_a_slow_query_at_the_step_timeout(
    db: Db, load_flows: Callable[[str], Config], query: str
) -> None:
    await db.insert(1, "a")
    steps = f"""\
      - name: slow
        kind: sql
        timeout: 1s
        url: "{db.url}"
        query: "{query.format(table=db.table)}"
"""
    [step] = (await run_flow(load_flows(flow(steps)))).steps
    assert step.reason == "timeout"
    assert step.message is not None and step.message.startswith(
        "the server stopped the query for time"
    )
    assert step.latency_s is None or step.latency_s < 2


async def test_span_follows_the_database_conventions(
    otel_env: OtlpReceiver, sqlite_url: str, load_flows: Callable[[str], Config]
) -> None:
    steps = f"""\
      - name: row
        kind: sql
        url: "{sqlite_url}"
        query: "SELECT {{{{ run.id }}}} AS id"
"""
    result = await run_flow(load_flows(flow(steps)))
    assert result.steps[0].status == "passed", result.steps[0].message
    spans = await otel_env.wait_for(lambda got: any(s.name.startswith("SELECT") for s in got))
    [span] = [s for s in spans if s.name.startswith("SELECT")]
    assert span.name == "SELECT sqlite"
    assert span.kind == "CLIENT"
    assert (
        span.attributes
        | {
            "db.system.name": "sqlite",
            "db.operation.name": "SELECT",
            "db.query.text": "SELECT :hw_p0 AS id",
            "db.response.returned_rows": 1,
        }
        == span.attributes
    )
