"""The `sql` kind's pooled engines, one per database URL, and the one place its drivers' errors
become failures.

The engine makes one `SqlEngines` at start (`KindSpec.shared`) and lends it to every run, so
runs share a small pool per database instead of connecting each time; it is closed at stop.
A URL without a driver gets the async one hopwatch ships (`postgresql://` → asyncpg).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from probes.errors import ConnectError, OtherFailure, StepFailed, Timeout, drop_frames

# The async driver a URL without one gets; `mariadb://` is SQLAlchemy's MySQL dialect too.
ASYNC_DRIVERS: Final = {
    "postgresql": "asyncpg",
    "mysql": "aiomysql",
    "mariadb": "aiomysql",
    "sqlite": "aiosqlite",
}
POOL_SIZE: Final = 4  # per URL: checks are short and few at once per database
# A server's "your statement ran out of time" errors, by SQLSTATE (PostgreSQL's
# query_canceled) or MySQL error number (MariaDB's max_statement_time, MySQL's
# max_execution_time).
_TIMEOUT_SQLSTATES: Final = frozenset({"57014"})
_TIMEOUT_MYSQL_ERRORS: Final = frozenset({1969, 3024})


def async_url(text: str) -> URL:
    """`text` as a SQLAlchemy URL with an async driver; ValueError naming what is wrong (the
    URL's password never appears in it)."""
    try:
        url = make_url(text)
    except ArgumentError:
        raise ValueError("not a SQLAlchemy URL (dialect+driver://user@host/db)") from None
    if url.drivername in ASYNC_DRIVERS:
        url = url.set(drivername=f"{url.drivername}+{ASYNC_DRIVERS[url.drivername]}")
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise ValueError(f"unknown database dialect {url.drivername!r}") from None
    if not getattr(dialect, "is_async", False):
        wanted = ", ".join(f"{d}+{a}" for d, a in ASYNC_DRIVERS.items())
        raise ValueError(f"driver {url.drivername!r} is not async: use one of {wanted}")
    return url


def shown(url: URL) -> str:
    """The URL as messages and spans may show it: no password."""
    return url.render_as_string(hide_password=True)


class SqlEngines:
    """A pooled AsyncEngine per URL, made on first use and kept until `aclose`."""

    def __init__(self, **engine_options: Any) -> None:
        self._engines: dict[str, AsyncEngine] = {}
        self._options = {"pool_size": POOL_SIZE, "pool_pre_ping": True} | engine_options

    def engine_for(self, url: URL) -> AsyncEngine:
        key = url.render_as_string(hide_password=False)
        engine = self._engines.get(key)
        if engine is None:
            options = self._options if url.get_backend_name() != "sqlite" else {}
            engine = self._engines[key] = create_async_engine(url, **options)
        return engine

    async def aclose(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        await asyncio.gather(*(e.dispose() for e in engines), return_exceptions=True)


@dataclass(frozen=True, slots=True)
class Guard:
    """What to send before the query so it reads only, and stops by itself in time."""

    read_only: tuple[str, ...]
    timeout: Callable[[float], str | None]


_GUARDS: Final = {
    # Both apply to the transaction only: the pooled connection comes back as it left.
    "postgresql": Guard(
        ("SET TRANSACTION READ ONLY",),
        lambda s: f"SET LOCAL statement_timeout = {max(1, int(s * 1000))}",
    ),
    # SET TRANSACTION applies to the next transaction: the one this query starts.
    "mariadb": Guard(
        ("SET TRANSACTION READ ONLY",), lambda s: f"SET max_statement_time = {max(s, 0.001):.3f}"
    ),
    "mysql": Guard(
        ("SET TRANSACTION READ ONLY",),
        lambda s: f"SET max_execution_time = {max(1, int(s * 1000))}",
    ),
    # SQLite has no statement timeout: the runner's step timeout is the only one.
    "sqlite": Guard(("PRAGMA query_only = ON",), lambda s: None),
}


def guard_for(conn: AsyncConnection) -> Guard | None:
    dialect = conn.dialect
    name = "mariadb" if getattr(dialect, "is_mariadb", False) else dialect.name
    return _GUARDS.get(name)


def translate(exc: BaseException, url: URL, *, connecting: bool) -> StepFailed:
    """The driver's error as a failure: refused or denied while connecting is `connect_error`,
    a statement the server stopped for time is `timeout`, any other SQL error `error`. The
    message names the error and the URL without its password."""
    drop_frames(exc)
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    detail = _message(orig)
    where = shown(url)
    if connecting:
        return ConnectError(f"connecting to {where} failed: {detail}")
    if _sqlstate(orig) in _TIMEOUT_SQLSTATES or _mysql_errno(orig) in _TIMEOUT_MYSQL_ERRORS:
        return Timeout(f"the server stopped the query for time: {detail}")
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return ConnectError(f"connection to {where} lost: {detail}")
    return OtherFailure(f"query failed: {detail}")


def _message(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    name = type(exc).__name__
    args = getattr(exc, "args", ())
    # PyMySQL's errors are (number, text); asyncpg's and sqlite's are one text.
    text = " ".join(str(a) for a in args) if args else str(exc)
    if isinstance(exc, SQLAlchemyError):  # its str() would append the statement and parameters
        text = str(exc.args[0]) if exc.args else name
    return f"{name}: {text.strip()}" if text.strip() else name


def _sqlstate(exc: BaseException | None) -> str | None:
    # asyncpg errors carry `sqlstate`; SQLAlchemy's adaptor re-raises them with it as `pgcode`.
    for attr in ("sqlstate", "pgcode"):
        value = getattr(exc, attr, None)
        if isinstance(value, str):
            return value
    cause = getattr(exc, "__cause__", None)
    return getattr(cause, "sqlstate", None) if cause is not None else None


def _mysql_errno(exc: BaseException | None) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None
