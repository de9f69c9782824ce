"""Registered models: teacher weights an operator registered with `kt admin register-model`.

registered_models: name (unique; the spec says `timm:<arch>@registered:<name>`), the timm
architecture, the owning tenant (NULL: every tenant may use it), the file's sha256 and size, and
its card (create_model_kwargs, mean/std, input_size, norm_eval). The file and card themselves are
under <data_dir>/registry/<name>/.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "registered_models",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("arch", sa.String(length=200), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("card", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_registered_models_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registered_models")),
        sa.UniqueConstraint("name", name=op.f("uq_registered_models_name")),
    )
    op.create_index(op.f("ix_registered_models_tenant_id"), "registered_models", ["tenant_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_registered_models_tenant_id"), table_name="registered_models")
    op.drop_table("registered_models")
