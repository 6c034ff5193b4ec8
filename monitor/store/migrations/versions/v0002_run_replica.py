"""Runs name the cluster replica that ran them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable, so existing rows (runs of a single process) stay valid without a rewrite.
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("replica", sa.String(200), nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite it copies `runs` and drops the original, and with foreign keys
    # on, that drop deletes every hop (ON DELETE CASCADE). SQLite >= 3.35 drops a column in place.
    op.drop_column("runs", "replica")
