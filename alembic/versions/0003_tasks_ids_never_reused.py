"""tasks.id on SQLite: AUTOINCREMENT, so an id is never handed out twice.

A plain INTEGER PRIMARY KEY takes max(id) + 1: once cleanup had deleted the newest
finished tasks, the next task got one of their ids, and a client still holding
``/tasks/<id>`` of a cleaned-up task saw another task. PostgreSQL's sequence never reuses
an id: nothing changes there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # Rebuilt with its rows, which also start sqlite_sequence at the largest id kept.
    with op.batch_alter_table(
        "tasks", recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ):
        pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("tasks", recreate="always"):
        pass
