"""Admin API keys; a job's queue and worker heartbeat.

api_keys.is_admin: the key may call the /v1/admin routes (existing keys stay non-admin).
jobs.queue: the Celery queue ("cpu" / "gpu") the job was sent to, so that it can be sent there again.
jobs.heartbeat_at: written by the worker holding a running job; the reaper requeues a job whose
heartbeat is stale.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 06:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite adds these in place (ALTER TABLE ADD COLUMN), and copies the table to drop them
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("is_admin", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("queue", sa.String(length=16), server_default="cpu", nullable=False))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("heartbeat_at")
        batch.drop_column("queue")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("is_admin")
