"""The store's tables, declared once for queries, writes and the Alembic migrations alike."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

# Named constraints keep future migrations (and SQLite batch mode) deterministic.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Times are unix seconds (double precision), the unit RunResult carries, so no
# time-zone handling differs between SQLite and PostgreSQL.
runs = Table(
    "runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("flow", String(200), nullable=False),
    Column("variant", String(200), nullable=False),
    Column("location", String(200), nullable=False),
    Column("correlation", String(200), nullable=False),
    Column("started_at", Double, nullable=False),
    Column("finished_at", Double, nullable=False),
    Column("duration_s", Double, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("broken_step", String(200), nullable=True),
    Column("reason", String(64), nullable=True),
    Column("trace_id", String(64), nullable=True),
    Column("replica", String(200), nullable=True),  # the cluster member; null outside one
    Column("maintenance", Boolean, nullable=True),  # 0004: run in a maintenance window
    Index(None, "started_at"),
    Index(None, "flow", "variant", "started_at"),
)

step_results = Table(
    "step_results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("name", String(200), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("started_at", Double, nullable=False),
    Column("offset_s", Double, nullable=False),
    Column("latency_s", Double, nullable=True),
    Column("own_latency_s", Double, nullable=True),  # 0003: the hop's own part of latency_s
    Column("duration_s", Double, nullable=True),  # 0003: how long the step ran
    Column("reason", String(64), nullable=True),
    Column("message", Text, nullable=True),
    Column("phases", JSON, nullable=False),
    Column("attributes", JSON, nullable=False),
    Column("excerpt", Text, nullable=True),
    Column("cleanup", Boolean, nullable=False),
    Index(None, "run_id", "position"),
)

# Evidence of failed hops (a browser step's screenshot): the newest ARTIFACTS_KEPT are kept
# (monitor/store/rows.py), so the table stays bounded whatever fails how often.
step_artifacts = Table(
    "step_artifacts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),  # the hop's, as in step_results
    Column("name", String(64), nullable=False),
    Column("media_type", String(100), nullable=False),
    Column("data", LargeBinary, nullable=False),
    Index(None, "run_id"),
)

incidents = Table(
    "incidents",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("flow", String(200), nullable=False),
    Column("variant", String(200), nullable=False),
    Column("location", String(200), nullable=False),
    Column("step", String(200), nullable=False),
    Column("opened_at", Double, nullable=False),
    Column("closed_at", Double, nullable=True),
    Column("last_failure_at", Double, nullable=False),
    Column("failures", Integer, nullable=False),
    Column("flaps", Integer, nullable=False),
    Column("reason", String(64), nullable=True),
    Column("last_reason", String(64), nullable=True),
    Column("first_run_id", String(64), nullable=False),
    Column("last_failed_run_id", String(64), nullable=False),
    Column("closing_run_id", String(64), nullable=True),
    Column("close_reason", String(200), nullable=True),  # 0003: why, when not a passing run
    Index(None, "closed_at"),
    Index(None, "opened_at"),
    Index(None, "flow", "variant", "location", "step"),
)

# Maintenance windows added at run time (the API): kept here so that they survive a restart
# and every replica sharing the database sees them. Declared windows stay in the flow files.
maintenance_windows = Table(
    "maintenance_windows",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("flows", JSON, nullable=False),
    Column("variants", JSON, nullable=False),
    Column("start", Double, nullable=False),
    Column("end", Double, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Index(None, "end"),
)
