"""Reaching a database: the URL forms hopwatch accepts, and an engine tuned per backend."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import URL, event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

_PG_DRIVERS = {"postgres", "postgresql", "postgresql+psycopg2", "postgresql+psycopg"}
_SQLITE_DRIVERS = {"sqlite", "sqlite+pysqlite"}


def normalize_url(url: str) -> URL:
    """An async SQLAlchemy URL: a bare path means SQLite; plain `postgresql://` means asyncpg."""
    if "://" not in url:
        url = f"sqlite+aiosqlite:///{url}"
    parsed = make_url(url)
    if parsed.drivername in _PG_DRIVERS:
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif parsed.drivername in _SQLITE_DRIVERS:
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    return parsed


_NOTHING: dict[None, None] = {}


def bind_plainly() -> None:
    """Let sqlite3 bind None and bools without its adaptation protocol.

    sqlite3 binds only exact ints, floats and strings directly; any other value (None, a bool)
    goes through `microprotocols_adapt`, which fails two attribute look-ups, each formatting an
    AttributeError's message, before binding the value as it is. With ~9 such values in a run's
    rows that was 3 % of a saturated `hopwatch run`'s instructions, as much as SQLite's own
    inserts (callgrind). Registered adapters are found first: None stays None (`{}.get` returns
    it without calling Python code) and a bool becomes the int sqlite3 would have bound anyway.
    """
    sqlite3.register_adapter(type(None), _NOTHING.get)
    sqlite3.register_adapter(bool, int)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the writer writes; the busy timeout rides out short locks.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine(url: URL, connect_timeout_s: float = 5.0) -> AsyncEngine:
    """An engine tuned per backend; creates the SQLite file's directory if missing."""
    if url.get_backend_name() == "sqlite":
        bind_plainly()
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {}
    if url.get_driver_name() == "asyncpg":
        connect_args = {"timeout": connect_timeout_s, "command_timeout": 60}
    return create_async_engine(url, pool_pre_ping=True, connect_args=connect_args)
