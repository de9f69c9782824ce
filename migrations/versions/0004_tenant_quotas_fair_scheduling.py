"""Per-tenant quotas and fair scheduling.

tenants.max_running_jobs / max_queued_jobs / max_storage_bytes: this tenant's own limits (NULL: the
service-wide KT_MAX_*_PER_TENANT setting; 0: no limit), written by `kt admin set-limits`.
tenants.last_started_at: when a worker last started one of the tenant's jobs; the scheduler serves,
among the tenants with the fewest running jobs, the one that waited longest.
jobs.run_after: a job waiting out a retry's backoff is not started before it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite adds these in place (ALTER TABLE ADD COLUMN), and copies the table to drop them
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("max_running_jobs", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_queued_jobs", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_storage_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("run_after", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # recreate="never": SQLite (>= 3.35) drops the columns in place. Copying the tables, batch mode's
    # default there, would drop the old `tenants` with foreign keys on, and its ON DELETE CASCADE
    # would delete every tenant's rows (dropping the old `jobs` would unlink models and transfer sets).
    with op.batch_alter_table("jobs", recreate="never") as batch:
        batch.drop_column("run_after")
    with op.batch_alter_table("tenants", recreate="never") as batch:
        batch.drop_column("last_started_at")
        batch.drop_column("max_storage_bytes")
        batch.drop_column("max_queued_jobs")
        batch.drop_column("max_running_jobs")
