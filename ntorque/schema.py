"""The tables, declared once; Alembic's migrations must build exactly this."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)

# SQLite only treats a plain INTEGER primary key as the auto-incrementing rowid.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Times are seconds since the epoch (UTC): the lease arithmetic (now + timeout + backoff)
# is then the same plain addition on PostgreSQL and SQLite.
Epoch = sa.Float(precision=53)

applications = sa.Table(
    "applications",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created", Epoch, nullable=False),
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    # The app that enqueued the task (None with authentication off). Not a foreign key:
    # ntorque writes only an authenticated app's id and never deletes apps, and the check
    # and its index cost every insert and acquire (alembic 0002).
    sa.Column("app_id", sa.Integer, nullable=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("timeout", sa.Integer, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("content_type", sa.Text, nullable=True),
    # JSON list of [name, value] pairs: order and repeated names survive.
    sa.Column("headers", sa.Text, nullable=False, server_default="[]"),
    sa.Column("trace_context", sa.Text, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("retry_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("due", Epoch, nullable=False),
    sa.Column("created", Epoch, nullable=False),
    sa.Column("modified", Epoch, nullable=False),
    sa.Column("last_status", sa.Integer, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.CheckConstraint("status IN ('PENDING', 'COMPLETED', 'FAILED')", name="status"),
    # A task id names one task for good: without AUTOINCREMENT SQLite hands the id of the
    # newest row again once cleanup has deleted it (PostgreSQL's sequence never does).
    sqlite_autoincrement=True,
)

# Acquire, requeue and the backlog gauge only ever look at pending tasks: a partial index
# keeps their cost independent of how many finished tasks the table holds.
sa.Index(
    "ix_tasks_pending_due",
    tasks.c.due,
    postgresql_where=tasks.c.status == "PENDING",
    sqlite_where=tasks.c.status == "PENDING",
)
# Cleanup walks finished tasks by age.
sa.Index(
    "ix_tasks_finished_modified",
    tasks.c.modified,
    postgresql_where=tasks.c.status != "PENDING",
    sqlite_where=tasks.c.status != "PENDING",
)
