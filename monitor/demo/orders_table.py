"""Where the demo's data lands: the worker writes each order it fulfils to a table, as a real
worker writes to its database, so the demo's flow can end with a `sql` step reading it back.

By default a SQLite file in the demo's temporary directory; `hopwatch demo --orders-db URL`
names another database (any the `sql` kind reads: PostgreSQL, MySQL/MariaDB, SQLite).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from pathlib import Path
from typing import Final

from sqlalchemy import Column, MetaData, String, Table, delete, insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from probes.sql_engines import async_url, shown

log = logging.getLogger(__name__)

TABLE: Final = "fulfilled_orders"
_metadata = MetaData()
orders = Table(
    TABLE,
    _metadata,
    Column("order_id", String(64), primary_key=True),
    Column("ref", String(200)),
    Column("sku", String(200)),
    Column("status", String(32), nullable=False),
    # The X-Hopwatch-Run marker of a synthetic order, so business figures can leave it out.
    Column("synthetic_run", String(200)),
    Column("fulfilled_at", String(40), nullable=False),
)


def default_url(folder: Path) -> str:
    """A SQLite file in `folder` (the demo's temporary directory)."""
    return f"sqlite:///{folder / 'demo-orders.db'}"


class OrdersTable:
    """The worker's table: made on first use, one row per order (a redelivered order replaces
    its row)."""

    def __init__(self, url: str) -> None:
        self.url = async_url(url)  # ValueError, without the password, for a bad URL
        self._engine: AsyncEngine | None = None
        self._made = asyncio.Lock()

    @property
    def shown(self) -> str:
        """The URL as the demo prints it: no password."""
        return shown(self.url)

    async def _ready(self) -> AsyncEngine:
        async with self._made:
            if self._engine is None:
                engine = create_async_engine(self.url)
                try:
                    async with engine.begin() as conn:
                        await conn.run_sync(_metadata.create_all)
                except BaseException:
                    await engine.dispose()
                    raise
                self._engine = engine
            return self._engine

    async def prepare(self) -> None:
        """Make the table now, so a `sql` step finds it before the first order; a database
        that is not there yet is logged and tried again at the first order."""
        try:
            await self._ready()
        except (SQLAlchemyError, OSError) as exc:
            log.warning("demo orders table %s not ready yet: %s", self.shown, exc)

    async def record(self, order_id: str, ref: object, sku: object, marker: str) -> None:
        """Write the order's row (raises SQLAlchemyError/OSError when the database fails)."""
        engine = await self._ready()
        row = {
            "order_id": order_id,
            "ref": None if ref is None else str(ref),
            "sku": None if sku is None else str(sku),
            "status": "fulfilled",
            "synthetic_run": marker or None,
            "fulfilled_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        async with engine.begin() as conn:  # portable upsert: one transaction
            await conn.execute(delete(orders).where(orders.c.order_id == order_id))
            await conn.execute(insert(orders).values(**row))

    async def aclose(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
