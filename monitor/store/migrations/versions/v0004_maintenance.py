"""Maintenance windows added at run time; runs say whether they ran in one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable, so existing rows stay valid without a rewrite (null reads as "not in one").
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("maintenance", sa.Boolean(), nullable=True))
    op.create_table(
        "maintenance_windows",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("flows", sa.JSON(), nullable=False),
        sa.Column("variants", sa.JSON(), nullable=False),
        sa.Column("start", sa.Double(), nullable=False),
        sa.Column("end", sa.Double(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_maintenance_windows"),
    )
    op.create_index(
        "ix_maintenance_windows_end", "maintenance_windows", ["end"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_maintenance_windows_end", table_name="maintenance_windows")
    op.drop_table("maintenance_windows")
    # Not batch mode, as in 0002: a copy of `runs` would cascade-delete every hop on SQLite.
    op.drop_column("runs", "maintenance")
