"""Datasets declare their task.

datasets: ``task`` (``classification``: class folders of images; ``segmentation``: images/ +
masks/ + classes.json). Existing rows are classification datasets (the server default).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 17:25:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(
            sa.Column("task", sa.String(length=16), nullable=False, server_default="classification")
        )


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("task")
