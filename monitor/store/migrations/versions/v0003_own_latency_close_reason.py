"""A hop's own latency and the step's duration; why an incident closed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("step_results") as batch:
        batch.add_column(sa.Column("own_latency_s", sa.Double(), nullable=True))
        batch.add_column(sa.Column("duration_s", sa.Double(), nullable=True))
    with op.batch_alter_table("incidents") as batch:
        batch.add_column(sa.Column("close_reason", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("incidents") as batch:
        batch.drop_column("close_reason")
    with op.batch_alter_table("step_results") as batch:
        batch.drop_column("duration_s")
        batch.drop_column("own_latency_s")
