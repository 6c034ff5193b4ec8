"""The `sql` kind: read where the data lands (a row a worker wrote) and check it, polling until
it is there.

Every `{{ … }}` in `query` becomes a bound parameter, never text spliced into the SQL, so a value
taken from a response cannot change the statement. The query runs in a read-only transaction
that is always rolled back, with a server-side statement timeout where the database has one.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import URL, TextClause, text
from sqlalchemy.exc import SQLAlchemyError

from probes import untrusted_json
from probes.base import StepConfigBase, StepContext, StepOutcome, Untrusted
from probes.checks import (
    JSON_PATH_KEYS,
    check_json_paths,
    check_latency,
    json_path_get,
    same_value,
    validate_json_path,
)
from probes.durations import Duration
from probes.errors import (
    AssertionFailed,
    ConnectError,
    ExtractFailed,
    OtherFailure,
    StepFailed,
    Timeout,
)
from probes.kinds import KindSpec, SpanShape, render_quietly
from probes.sql_engines import SqlEngines, async_url, guard_for, translate

KIND: Final = "sql"
_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_DOTTED = re.compile(r"\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*")
# A colon SQLAlchemy's text() would read as a bind (`:name`), in the query's own text.
_COLON_BIND = re.compile(r"(?<![:\w\\]):(?=\w)")
_PARAM: Final = "hw_p"
_MARGIN_S: Final = 0.05  # the server's statement timeout fires this much before the runner's


class SqlExpect(BaseModel):
    """What the rows must look like."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    rows: int | None = Field(default=None, ge=0, description="Exact row count; default: any.")
    columns: dict[str, Any] = Field(
        default_factory=dict,
        description="Column → wanted value in the first row (templates rendered); default none.",
    )
    json_: dict[str, Annotated[dict[str, Any], JSON_PATH_KEYS]] = Field(
        default_factory=dict,
        alias="json",
        description="JSON column → {JSON path → wanted value} in the first row; default none.",
    )
    max_latency: Duration | None = Field(
        default=None, description="Latency budget, e.g. 500ms; default: none."
    )


class SqlExtract(BaseModel):
    """A value of the first row: a column, or a JSON path inside a JSON column."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    column: str = Field(description="Column name.")
    json_: str | None = Field(
        default=None, alias="json", description="JSON path inside the column; default: none."
    )

    @field_validator("json_")
    @classmethod
    def _path_parses(cls, value: str | None) -> str | None:
        return validate_json_path(value) if value is not None else None


class Config(StepConfigBase):
    """A query against a database, checked on its rows."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    kind: Literal["sql"] = Field(description="Step kind.")
    url: str = Field(
        description="SQLAlchemy URL (postgresql://, mysql:// or mariadb://, sqlite:///path), "
        "usually a secret reference such as ${env:ORDERS_DB}."
    )
    query: str = Field(
        description="SQL; each {{ … }} is a bound parameter, written without quotes "
        "(WHERE ref = {{ run.correlation }})."
    )
    expect: SqlExpect = Field(default_factory=SqlExpect, description="Assertions; default none.")
    until: SqlExpect | None = Field(
        default=None,
        description="Poll until the rows look like this (same shape as expect); default: "
        "query once.",
    )
    every: Duration = Field(default=0.5, description="Pause between polls; default 500ms.")
    within: Duration = Field(default=10.0, description="Give up polling after; default 10s.")
    extract: dict[str, SqlExtract] = Field(
        default_factory=dict, description="Values of the first row for later steps; default none."
    )

    @field_validator("url")
    @classmethod
    def _url_is_async(cls, value: str) -> str:
        if "{{" not in value and "${" not in value:  # a literal: check it now, not per run
            async_url(value)
        return value

    @field_validator("query")
    @classmethod
    def _only_expressions(cls, value: str) -> str:
        if "{%" in value or "{#" in value:
            raise ValueError("only {{ … }} expressions are allowed, each becomes a bound parameter")
        if not value.strip():
            raise ValueError("query is empty")
        return value

    @model_validator(mode="after")
    def _poll_window(self) -> Config:
        if self.until is not None and self.every <= 0:
            raise ValueError("every must be more than 0s")
        return self


@dataclass(frozen=True, slots=True)
class Statement:
    """The query with its expressions replaced by binds, and the expressions in order."""

    clause: TextClause
    sql: str
    expressions: tuple[str, ...]


@lru_cache(maxsize=1024)
def compile_query(query: str) -> Statement:
    """`query` as text() with `:hw_p0`, `:hw_p1`, … where its `{{ … }}` were; the SQL's own
    colons are escaped so only ours are binds."""
    parts: list[str] = []
    expressions: list[str] = []
    at = 0
    for match in _TEMPLATE.finditer(query):
        parts.append(_COLON_BIND.sub(r"\\:", query[at : match.start()]))
        parts.append(f":{_PARAM}{len(expressions)}")
        expressions.append(match.group(1))
        at = match.end()
    parts.append(_COLON_BIND.sub(r"\\:", query[at:]))
    sql = "".join(parts)
    return Statement(text(sql), sql, tuple(expressions))


def bind_values(statement: Statement, ctx: StepContext) -> dict[str, Any]:
    """Each expression's value: a dotted name is looked up as it is (a number stays a number,
    so it compares with an integer column), anything else is rendered as text."""
    values: dict[str, Any] = {}
    variables = ctx.variables()
    for i, expression in enumerate(statement.expressions):
        values[f"{_PARAM}{i}"] = _value(expression, variables, ctx)
    return values


def _value(expression: str, variables: Mapping[str, Any], ctx: StepContext) -> Any:
    dotted = _DOTTED.fullmatch(expression)
    if dotted is not None:
        value: Any = variables
        for name in dotted.group(1).split("."):
            if not isinstance(value, Mapping) or name not in value:
                break
            value = value[name]
        else:
            if isinstance(value, str):
                return str(value)  # a plain str: drivers check the exact type
            if value is None or isinstance(value, int | float | bool):
                return value
    return ctx.render("{{" + expression + "}}")


def plain(value: Any) -> Any:
    """A database value as JSON would carry it (what assertions compare and steps extract)."""
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return value


@dataclass(slots=True)
class Rows:
    columns: list[str]
    rows: list[dict[str, Any]]
    latency_s: float

    def first(self, column: str) -> Any:
        if not self.rows:
            raise KeyError("no rows")
        if column not in self.rows[0]:
            raise KeyError(f"no column {column!r} (columns: {', '.join(self.columns)})")
        return self.rows[0][column]


async def run_query(
    engines: SqlEngines, url: URL, statement: Statement, values: dict[str, Any], budget: float
) -> Rows:
    """One query in its own read-only transaction, rolled back; connect and query errors
    translated (the only place the drivers' errors are seen)."""
    engine = engines.engine_for(url)
    started = time.monotonic()
    deadline = started + budget
    try:
        conn = await engine.connect()
    except (SQLAlchemyError, OSError) as exc:
        raise translate(exc, url, connecting=True) from exc
    try:
        try:
            await conn.begin()
            guard = guard_for(conn)
            if guard is not None:
                for setting in guard.read_only:
                    await conn.exec_driver_sql(setting)
                # What is left after connecting, less a margin for the statement's own trip, so
                # the server (which names the query) stops it before the runner's timer does.
                left = deadline - time.monotonic()
                limit = guard.timeout(max(0.001, left - max(_MARGIN_S, left / 10)))
                if limit is not None:
                    await conn.exec_driver_sql(limit)
            result = await conn.execute(statement.clause, values)
            columns = list(result.keys())
            rows = [dict(zip(columns, map(plain, row), strict=True)) for row in result]
        finally:
            await conn.close()  # rolls the transaction back: nothing it did stays
    except (SQLAlchemyError, OSError) as exc:
        raise translate(exc, url, connecting=False) from exc
    return Rows(columns, rows, time.monotonic() - started)


def check_rows(expect: SqlExpect, rows: Rows, ctx: StepContext) -> None:
    """Raise the first assertion that does not hold."""
    if expect.rows is not None and len(rows.rows) != expect.rows:
        raise AssertionFailed(f"{len(rows.rows)} rows, want {expect.rows}")
    for column, want in expect.columns.items():
        found = _first(rows, column, AssertionFailed)
        wanted = ctx.render_value(want)
        if not same_value(found, wanted):
            raise AssertionFailed(f"column {column} is {found!r}, want {wanted!r}")
    for column, paths in expect.json_.items():
        doc = _json(_first(rows, column, AssertionFailed), column, AssertionFailed)
        check_json_paths(doc, ctx.render_value(paths), f"column {column}: ")
    check_latency(expect.max_latency, rows.latency_s)


def extract_values(rules: Mapping[str, SqlExtract], rows: Rows) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rule in rules.items():
        value = _first(rows, rule.column, ExtractFailed, name)
        if rule.json_ is not None:
            found = json_path_get(_json(value, rule.column, ExtractFailed, name), rule.json_)
            if not found:
                raise ExtractFailed(f"{name}: {rule.json_} not in column {rule.column}")
            value = found[0]
        out[name] = Untrusted(value) if isinstance(value, str) else value
    return out


def _first(rows: Rows, column: str, failure: type[StepFailed], name: str = "") -> Any:
    try:
        return rows.first(column)
    except KeyError as exc:
        prefix = f"{name}: " if name else ""
        raise failure(f"{prefix}{exc.args[0]}, want column {column}") from None


def _json(value: Any, column: str, failure: type[StepFailed], name: str = "") -> Any:
    if not isinstance(value, str | bytes):
        return value  # a driver that decodes JSON columns itself
    try:
        return untrusted_json.loads(value.encode() if isinstance(value, str) else value)
    except untrusted_json.NotJson as exc:
        prefix = f"{name}: " if name else ""
        raise failure(f"{prefix}column {column} is not JSON: {exc}") from None


class SqlProbe:
    async def run(self, config: Config, ctx: StepContext) -> StepOutcome:
        engines = ctx.lent(KIND, SqlEngines)
        try:
            url = async_url(ctx.render(config.url))
        except ValueError as exc:
            raise OtherFailure(f"url: {exc}") from None
        statement = compile_query(config.query)
        values = bind_values(statement, ctx)
        started = time.monotonic()
        if config.until is None:
            rows = await run_query(engines, url, statement, values, self._budget(config, ctx))
            return self._judged(config, rows, ctx, rows.latency_s)
        deadline = started + config.within
        attempts = 0
        while True:
            attempts += 1
            try:
                budget = min(self._budget(config, ctx), max(0.0, deadline - time.monotonic()))
                rows = await run_query(engines, url, statement, values, budget)
                check_rows(config.until, rows, ctx)
                outcome = self._judged(config, rows, ctx, time.monotonic() - started)
                outcome.attributes["attempts"] = attempts
                return outcome
            except (AssertionFailed, Timeout, ConnectError) as failed:
                last = failed  # the row may land, the database may come back: try again
            pause = min(config.every, deadline - time.monotonic())
            if pause <= 0:
                break
            await asyncio.sleep(pause)
        raise type(last)(
            f"{last} (still, after {attempts} attempts in {config.within:g}s)",
            latency_s=time.monotonic() - started,
            attributes={"attempts": attempts},
        )

    @staticmethod
    def _budget(config: Config, ctx: StepContext) -> float:
        budget = ctx.remaining()
        return min(budget, config.timeout) if config.timeout is not None else budget

    @staticmethod
    def _judged(config: Config, rows: Rows, ctx: StepContext, latency_s: float) -> StepOutcome:
        attributes: dict[str, Any] = {"db.response.returned_rows": len(rows.rows)}
        try:
            check_rows(config.expect, rows, ctx)
            values = extract_values(config.extract, rows)
        except StepFailed as failed:
            failed.attributes.update(attributes)
            failed.latency_s = latency_s
            raise
        return StepOutcome(latency_s=latency_s, vars=values, attributes=attributes)


_SYSTEMS: Final = {"postgresql": "postgresql", "mysql": "mysql", "sqlite": "sqlite"}


def sql_span(config: Config, ctx: StepContext) -> SpanShape:
    """A CLIENT span per the database conventions: `{operation} {database}`, the system, the
    database, the server and the parameterised query text (its values are bound, not in it)."""
    statement = compile_query(config.query)
    operation = statement.sql.split(None, 1)[0].upper() if statement.sql.split() else "QUERY"
    attrs: dict[str, Any] = {"db.query.text": statement.sql, "db.operation.name": operation}
    try:
        url = async_url(render_quietly(ctx, config.url))
    except ValueError:
        return SpanShape(f"{operation}", "client", attrs)
    backend = url.get_backend_name()
    system = "mariadb" if url.drivername.startswith("mariadb") else _SYSTEMS.get(backend, backend)
    attrs["db.system.name"] = system
    if url.database:
        attrs["db.namespace"] = url.database
    if url.host:
        attrs["server.address"] = url.host
    if url.port is not None:
        attrs["server.port"] = url.port
    target = url.database if url.database and backend != "sqlite" else system
    return SpanShape(f"{operation} {target}", "client", attrs)


SQL_FAILURES: Final[Sequence[type[StepFailed]]] = (
    ConnectError, Timeout, AssertionFailed, ExtractFailed, OtherFailure,
)  # fmt: skip

SPEC = KindSpec(Config, SqlProbe(), failures=tuple(SQL_FAILURES), span=sql_span, shared=SqlEngines)
