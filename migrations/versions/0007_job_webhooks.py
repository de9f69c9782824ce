"""Job-finished notifications (webhooks).

jobs: ``webhook_url`` (where the service POSTs when the job ends), ``webhook_secret`` (the HMAC
key returned at submit), ``webhook_state`` (waiting / sending / retrying / delivered / failed,
indexed: the dispatcher looks for work by it), ``webhook_next_at`` (the next try, or the end of a
dispatcher's hold) and ``webhook_delivery`` (the attempts, as JSON). All nullable: a job without a
webhook has none of them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 16:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook_url", sa.Text(), nullable=True))
        batch.add_column(sa.Column("webhook_secret", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("webhook_state", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("webhook_next_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("webhook_delivery", sa.JSON(), nullable=True))
    op.create_index("ix_jobs_webhook_state", "jobs", ["webhook_state"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_webhook_state", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for name in ("webhook_delivery", "webhook_next_at", "webhook_state", "webhook_secret", "webhook_url"):
            batch.drop_column(name)
