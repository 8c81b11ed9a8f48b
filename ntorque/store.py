"""Every statement ntorque runs, behind one narrow API; the locking and fencing rules live here.

On PostgreSQL the hot statements (enqueue, acquire, record, read a task) are spelled in
pgdirect.py and run on asyncpg directly; the SQLAlchemy statements here are the same rules,
which SQLite runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from . import db, pgdirect
from .backoff import backoff_table
from .constants import COMPLETED, FAILED, PENDING
from .models import NewTask, Outcome, Task
from .pgdirect import DirectConnections, StoreUnavailable
from .schema import applications, tasks
from .settings import Settings

logger = logging.getLogger("ntorque.store")

# Largest id PostgreSQL's BIGINT holds: anything beyond is "no such task", not an error.
MAX_TASK_ID = 2**63 - 1


@dataclass(frozen=True, slots=True)
class App:
    id: int
    name: str
    is_active: bool


@dataclass(frozen=True, slots=True)
class Backlog:
    due: int
    oldest_due_age_s: float


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class Store:
    """The narrow store API the web, worker and clock use; the dialect stays in here."""

    def __init__(self, engine: AsyncEngine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.dialect = engine.dialect.name
        self._is_pg = self.dialect == "postgresql"
        table = backoff_table(
            settings.max_retries + 1,
            strategy=settings.backoff,
            min_delay_s=settings.min_due_delay_s,
            max_delay_s=settings.max_due_delay_s,
        )
        # The lease set at acquire: now + timeout + backoff(new retry_count), per row, in SQL.
        lease_backoff = sa.case(
            {old: sa.literal(table[old + 1], sa.Float) for old in range(len(table) - 1)},
            value=tasks.c.retry_count,
            else_=sa.literal(settings.max_due_delay_s, sa.Float),
        )
        self._lease_backoff = lease_backoff
        self._returning = list(tasks.c)
        self._backoff_table = table
        self._direct = DirectConnections(engine, settings) if self._is_pg else None
        # Each hot statement's bound: past it the database counts as unavailable and the
        # connection is closed. The driver's own bound (30 s) would hold a web's group
        # commit stuck on a dead connection (a failover, a black hole) that long, every
        # enqueue meanwhile answered 503. A commit's clients have all been answered by then
        # (their deadlines are as long and began earlier), so none is still waiting on it.
        self._pg_timeout_s = settings.db_timeout_s

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        return cls(db.create_engine(settings), settings)

    async def close(self) -> None:
        if self._direct is not None:
            await self._direct.close()
        await self.engine.dispose()

    def _pg(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """An asyncpg connection for a hot statement (PostgreSQL only)."""
        assert self._direct is not None
        return self._direct.connection()

    # -- health -----------------------------------------------------------------------

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    # -- applications -----------------------------------------------------------------

    async def create_app(self, name: str) -> tuple[App, str]:
        """Create an active app; return it with its API key (only its hash is stored)."""
        key = secrets.token_hex(20)
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    applications.insert()
                    .values(name=name, key_hash=hash_key(key), is_active=True, created=time.time())
                    .returning(applications.c.id)
                )
            ).one()
        return App(id=row.id, name=name, is_active=True), key

    async def set_app_active(self, name: str, active: bool) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                applications.update().where(applications.c.name == name).values(is_active=active)
            )
        return int(result.rowcount)

    async def app_for_key(self, key: str) -> App | None:
        """The active app owning ``key``, or None."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        applications.c.id, applications.c.name, applications.c.is_active
                    ).where(applications.c.key_hash == hash_key(key))
                )
            ).first()
        if row is None or not row.is_active:
            return None
        return App(id=row.id, name=row.name, is_active=True)

    async def count_apps(self) -> int:
        async with self.engine.connect() as conn:
            return int(
                (
                    await conn.execute(sa.select(sa.func.count()).select_from(applications))
                ).scalar_one()
            )

    # -- tasks: enqueue and read ------------------------------------------------------

    async def add_tasks(self, new: Sequence[NewTask]) -> list[Task]:
        """Insert tasks in one transaction (a group commit); return them in the given order."""
        now = time.time()
        if self._is_pg:
            return await self._pg_add_tasks(new, now)
        rows = [
            {
                "app_id": t.app_id,
                "url": t.url,
                "method": t.method,
                "timeout": t.timeout,
                "body": t.body,
                "content_type": t.content_type,
                "headers": json.dumps(t.headers),
                "trace_context": t.trace_context,
                "status": PENDING,
                "retry_count": 0,
                "due": now,
                "created": now,
                "modified": now,
            }
            for t in new
        ]
        async with self.engine.begin() as conn:
            result = await conn.execute(
                tasks.insert().returning(tasks.c.id, sort_by_parameter_order=True), rows
            )
            ids = [r.id for r in result]
        return self._added(ids, new, now)

    async def _pg_add_tasks(self, new: Sequence[NewTask], now: float) -> list[Task]:
        if len(new) == 1:
            t = new[0]
            async with self._pg() as conn:
                task_id = await conn.fetchval(
                    pgdirect.INSERT_ONE,
                    t.app_id,
                    t.url,
                    t.method,
                    t.timeout,
                    t.body,
                    t.content_type,
                    pgdirect.headers_json(t.headers),
                    t.trace_context,
                    now,
                    timeout=self._pg_timeout_s,
                )
            return self._added([task_id], new, now)
        args = (
            [t.app_id for t in new],
            [t.url for t in new],
            [t.method for t in new],
            [t.timeout for t in new],
            [t.body for t in new],
            [t.content_type for t in new],
            [pgdirect.headers_json(t.headers) for t in new],
            [t.trace_context for t in new],
            now,
        )
        async with self._pg() as conn:
            rows = await conn.fetch(pgdirect.INSERT, *args, timeout=self._pg_timeout_s)
        # Ids come from the sequence in the ORDER BY order, so ascending ids follow the
        # input order (what SQLAlchemy's sort_by_parameter_order relies on as well).
        return self._added(sorted(r[0] for r in rows), new, now)

    @staticmethod
    def _added(ids: Sequence[int], new: Sequence[NewTask], now: float) -> list[Task]:
        return [
            Task(
                id=task_id,
                app_id=t.app_id,
                url=t.url,
                method=t.method,
                timeout=t.timeout,
                body=t.body,
                content_type=t.content_type,
                headers=t.headers,
                trace_context=t.trace_context,
                status=PENDING,
                retry_count=0,
                due=now,
                created=now,
                modified=now,
                last_status=None,
                last_error=None,
            )
            for task_id, t in zip(ids, new, strict=True)
        ]

    async def get_task(self, task_id: int, app_id: int | None = None) -> Task | None:
        """The task, or None if it does not exist or belongs to another app."""
        if not 0 < task_id <= MAX_TASK_ID:
            return None
        if self._is_pg:
            # asyncpg directly: SQLAlchemy closes a connection whose statement was given up
            # (the web's database deadline) gracefully, waiting up to 2 s more for an
            # unreachable server before the request can answer 503.
            async with self._pg() as conn:
                if app_id is None:
                    found = await conn.fetchrow(pgdirect.GET, task_id, timeout=self._pg_timeout_s)
                else:
                    found = await conn.fetchrow(
                        pgdirect.GET_FOR_APP, task_id, app_id, timeout=self._pg_timeout_s
                    )
            return None if found is None else Task.from_mapping(found)
        query = sa.select(tasks).where(tasks.c.id == task_id)
        if app_id is not None:
            query = query.where(tasks.c.app_id == app_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else Task.from_row(row)

    # -- tasks: acquire and record ----------------------------------------------------

    def _acquirable(self, now: float) -> sa.ColumnElement[bool]:
        return sa.and_(
            tasks.c.status == PENDING,
            tasks.c.due <= now,
            tasks.c.retry_count <= self.settings.max_retries,
        )

    async def _acquire_where(self, ids: sa.Select[Any], now: float) -> list[Task]:
        # The inner SELECT locks the rows it picks and skips rows another worker holds;
        # the outer UPDATE takes the attempt and sets the lease. Under READ COMMITTED the
        # lock re-checks the row's newest version, so one attempt has exactly one owner.
        stmt = (
            tasks.update()
            .where(tasks.c.id.in_(ids.scalar_subquery()))
            .values(
                retry_count=tasks.c.retry_count + 1,
                due=sa.literal(now, sa.Float) + tasks.c.timeout + self._lease_backoff,
                modified=now,
            )
            .returning(*self._returning)
        )
        async with self.engine.begin() as conn:
            rows = (await conn.execute(stmt)).all()
        return [Task.from_row(r) for r in rows]

    async def acquire(self, ids: Sequence[int], now: float | None = None) -> list[Task]:
        """Take the next attempt of each of ``ids`` that is pending and due; skip the rest."""
        ids = sorted({i for i in ids if 0 < i <= MAX_TASK_ID})
        if not ids:
            return []
        now = time.time() if now is None else now
        if self._is_pg:
            if len(ids) == 1:
                return await self._pg_acquire(pgdirect.ACQUIRE_ONE, now, ids[0])
            return await self._pg_acquire(pgdirect.ACQUIRE_IDS, now, ids)
        match = tasks.c.id.in_(ids)
        inner = (
            sa.select(tasks.c.id)
            .where(match, self._acquirable(now))
            .with_for_update(skip_locked=True)
        )
        return await self._acquire_where(inner, now)

    async def acquire_due(self, limit: int, now: float | None = None) -> list[Task]:
        """Take up to ``limit`` due tasks, oldest due first (the poll when no one rang)."""
        now = time.time() if now is None else now
        if self._is_pg:
            return await self._pg_acquire(pgdirect.ACQUIRE_DUE, now, limit)
        inner = (
            sa.select(tasks.c.id)
            .where(self._acquirable(now))
            .order_by(tasks.c.due)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return await self._acquire_where(inner, now)

    async def _pg_acquire(self, sql: str, now: float, which: Any) -> list[Task]:
        args = (
            now,
            self.settings.max_retries,
            self._backoff_table,
            self.settings.max_due_delay_s,
            which,
        )
        async with self._pg() as conn:
            rows = await conn.fetch(sql, *args, timeout=self._pg_timeout_s)
        return [Task.from_mapping(r) for r in rows]

    async def record(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Record outcomes; only the attempt that still holds its task's lease may write.

        Returns, for each outcome in order, whether it was written: a stale attempt's
        outcome (a newer attempt holds the task, or the task is finished) is dropped.
        """
        if not outcomes:
            return []
        now = time.time()
        if self._is_pg:
            # In id order: concurrent batches then lock rows in the same order.
            ordered = sorted(outcomes, key=lambda o: o.task_id)
            async with self._pg() as conn:
                rows = await conn.fetch(
                    pgdirect.RECORD,
                    [o.task_id for o in ordered],
                    [o.attempt for o in ordered],
                    [o.status for o in ordered],
                    [o.due for o in ordered],
                    [o.status_code for o in ordered],
                    [o.error for o in ordered],
                    now,
                    timeout=self._pg_timeout_s,
                )
            if len(rows) == len(outcomes):
                return [True] * len(outcomes)  # the usual batch: no lookups
            # The row's retry_count is the attempt that wrote it: one task's stale and
            # current attempts may share a batch.
            written = {(row[0], row[1]) for row in rows}
            return [(o.task_id, o.attempt) in written for o in outcomes]
        stmt = (
            tasks.update()
            .where(
                tasks.c.id == sa.bindparam("b_id"),
                tasks.c.retry_count == sa.bindparam("b_attempt"),
                tasks.c.status == PENDING,
            )
            .values(
                status=sa.bindparam("b_status"),
                due=sa.bindparam("b_due"),
                modified=now,
                last_status=sa.bindparam("b_code"),
                last_error=sa.bindparam("b_error"),
            )
        )
        params = [
            {
                "b_id": o.task_id,
                "b_attempt": o.attempt,
                "b_status": o.status,
                "b_due": o.due,
                "b_code": o.status_code,
                "b_error": o.error,
            }
            for o in outcomes
        ]
        async with self.engine.connect() as conn:
            async with conn.begin() as tx:
                result = await conn.execute(stmt, params)
                if result.rowcount == len(params):
                    return [True] * len(params)  # the usual batch; committed on the way out
                await tx.rollback()
            # Some were stale, and a batch's row count does not say which. SQLAlchemy has
            # no RETURNING for a batch of parameters on SQLite, and an UPDATE … FROM
            # (VALUES …) is compiled afresh for every batch (2 to 5 times slower than this
            # one, measured): so the rare batch holding a stale outcome is done again, one
            # statement per outcome, each one's row count its answer.
            async with conn.begin():
                return [(await conn.execute(stmt, p)).rowcount == 1 for p in params]

    # -- clock ------------------------------------------------------------------------

    async def due_ids(
        self, limit: int, now: float | None = None, after: tuple[float, int] | None = None
    ) -> list[tuple[float, int]]:
        """Up to ``limit`` (due, id) of acquirable tasks in due order, after the ``after`` key."""
        now = time.time() if now is None else now
        query = sa.select(tasks.c.due, tasks.c.id).where(self._acquirable(now))
        if after is not None:
            query = query.where(sa.tuple_(tasks.c.due, tasks.c.id) > sa.tuple_(*after))
        query = query.order_by(tasks.c.due, tasks.c.id).limit(limit)
        async with self.engine.connect() as conn:
            return [(r.due, r.id) for r in await conn.execute(query)]

    async def fail_exhausted(self, now: float | None = None) -> list[float]:
        """Fail tasks whose last allowed attempt's lease ran out with no outcome recorded.

        Returns when each failed task was created, for the enqueue-to-outcome histogram.
        """
        now = time.time() if now is None else now
        async with self.engine.begin() as conn:
            result = await conn.execute(
                tasks.update()
                .where(
                    tasks.c.status == PENDING,
                    tasks.c.due <= now,
                    tasks.c.retry_count > self.settings.max_retries,
                )
                .values(
                    status=FAILED,
                    modified=now,
                    last_error="the last attempt's lease expired without an answer",
                )
                .returning(tasks.c.created)
            )
            return [row.created for row in result]

    async def cleanup(self, older_than: float, batch: int) -> int:
        """Delete up to ``batch`` finished tasks last modified before ``older_than``."""
        doomed = (
            sa.select(tasks.c.id)
            .where(tasks.c.status.in_((COMPLETED, FAILED)), tasks.c.modified < older_than)
            .order_by(tasks.c.modified)
            .limit(batch)
        )
        if self._is_pg:
            doomed = doomed.with_for_update(skip_locked=True)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                tasks.delete().where(tasks.c.id.in_(doomed.scalar_subquery()))
            )
        return int(result.rowcount)

    async def backlog(self, now: float | None = None) -> Backlog:
        """How many tasks are due now, and how long the oldest has waited."""
        now = time.time() if now is None else now
        query = sa.select(sa.func.count(), sa.func.min(tasks.c.due)).where(
            tasks.c.status == PENDING, tasks.c.due <= now
        )
        async with self.engine.connect() as conn:
            count, oldest = (await conn.execute(query)).one()
        return Backlog(due=int(count), oldest_due_age_s=0.0 if oldest is None else now - oldest)

    async def schema_ready(self) -> bool:
        async with self.engine.connect() as conn:
            return await conn.run_sync(lambda c: sa.inspect(c).has_table("tasks"))


def describe(exc: BaseException) -> str:
    """An error for the log: a timeout's ``TimeoutError`` carries no message of its own."""
    return str(exc) or type(exc).__name__


def connection_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean 'the database cannot serve us now', whatever the driver."""
    return (
        StoreUnavailable,
        OSError,
        TimeoutError,
        sa.exc.OperationalError,
        sa.exc.InterfaceError,
        sa.exc.DBAPIError,
    )


async def open_store(settings: Settings) -> Store:
    """A store on a schema that is ready: migrated first where ntorque owns the migration."""
    if settings.auto_migrate:
        try:
            await db.upgrade_async(settings)
        except connection_errors() as exc:
            # Serve 503s until the database is back rather than crash-looping.
            logger.error("could not migrate, database unavailable: %s", describe(exc))
    return Store.from_settings(settings)
