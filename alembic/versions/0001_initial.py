"""Initial schema: applications and tasks.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Epoch = sa.Float(precision=53)


def upgrade() -> None:
    op.create_table(
        "applications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("is_active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("created", Epoch, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_applications"),
        sa.UniqueConstraint("key_hash", name="uq_applications_key_hash"),
    )
    op.create_table(
        "tasks",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("app_id", sa.Integer(), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("timeout", sa.Integer(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=True),
        sa.Column("headers", sa.Text(), server_default="[]", nullable=False),
        sa.Column("trace_context", sa.Text(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("retry_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("due", Epoch, nullable=False),
        sa.Column("created", Epoch, nullable=False),
        sa.Column("modified", Epoch, nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            # op.f: the name is final; target_metadata's naming convention would
            # otherwise prefix it again (ck_tasks_ck_tasks_status).
            "status IN ('PENDING', 'COMPLETED', 'FAILED')",
            name=op.f("ck_tasks_status"),
        ),
        sa.ForeignKeyConstraint(
            ["app_id"],
            ["applications.id"],
            name="fk_tasks_app_id_applications",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
    )
    op.create_index("ix_tasks_app_id", "tasks", ["app_id"])
    op.create_index(
        "ix_tasks_pending_due",
        "tasks",
        ["due"],
        postgresql_where=sa.text("status = 'PENDING'"),
        sqlite_where=sa.text("status = 'PENDING'"),
    )
    op.create_index(
        "ix_tasks_finished_modified",
        "tasks",
        ["modified"],
        postgresql_where=sa.text("status != 'PENDING'"),
        sqlite_where=sa.text("status != 'PENDING'"),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_finished_modified", table_name="tasks")
    op.drop_index("ix_tasks_pending_due", table_name="tasks")
    op.drop_index("ix_tasks_app_id", table_name="tasks")
    op.drop_table("tasks")
    op.drop_table("applications")
