"""PostgreSQL's hot path: the statements run on asyncpg directly, and their connections.

Enqueue, acquire, outcome recording and reading a task run here on PostgreSQL: one
statement per batch, whatever its size (arrays through unnest), prepared once per connection
by asyncpg's statement cache. SQLAlchemy's per-row parameter and result processing cost more
than the database work here (see bench/). They follow the rules of the SQLAlchemy statements
in store.py, which SQLite runs; store.py chooses between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from . import db
from .settings import Settings


class StoreUnavailable(Exception):
    """The database cannot be reached or did not answer in time."""


_COLUMNS = (
    "id, app_id, url, method, timeout, body, content_type, headers, trace_context, status,"
    " retry_count, due, created, modified, last_status, last_error"
)
GET = f"SELECT {_COLUMNS} FROM tasks WHERE id = $1"
GET_FOR_APP = f"SELECT {_COLUMNS} FROM tasks WHERE id = $1 AND app_id = $2"
INSERT = """
INSERT INTO tasks (app_id, url, method, timeout, body, content_type, headers, trace_context,
                   status, retry_count, due, created, modified)
SELECT a, u, m, t, b, ct, h, tc, 'PENDING', 0, $9::float8, $9::float8, $9::float8
FROM unnest($1::int[], $2::text[], $3::text[], $4::int[], $5::bytea[], $6::text[],
            $7::text[], $8::text[]) WITH ORDINALITY AS x(a, u, m, t, b, ct, h, tc, n)
ORDER BY n
RETURNING id
"""
# A lone task (every enqueue at low load) goes in as plain VALUES: the unnest, ordinality
# and sort of the batch form cost ~0.1 ms of a latency-bound request (bench D).
INSERT_ONE = """
INSERT INTO tasks (app_id, url, method, timeout, body, content_type, headers, trace_context,
                   status, retry_count, due, created, modified)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'PENDING', 0, $9::float8, $9::float8, $9::float8)
RETURNING id
"""
# $1 now, $2 max_retries, $3 backoff_table() (1-based in SQL: [k + 1] is the k-th retry's
# delay), $4 the cap; the new due is now + timeout + backoff(new retry_count): the lease.
_ACQUIRE = """
UPDATE tasks SET retry_count = retry_count + 1,
    due = $1::float8 + timeout + coalesce(($3::float8[])[retry_count + 2], $4::float8),
    modified = $1::float8
WHERE id IN (
    SELECT id FROM tasks
    WHERE {pending} AND due <= $1::float8 AND retry_count <= $2::int AND {match}
    FOR UPDATE SKIP LOCKED)
RETURNING {columns}
"""
# Statements given ids must find them by primary key. Spelt plainly, "status = 'PENDING'"
# lets the planner use the partial index of pending tasks instead, and with statistics
# taken before a backlog built up (a table of finished history: bench E) it then scans
# every pending task for each batch. This spelling is the same test on a text value, which
# the partial index's predicate does not cover.
_PENDING_BY_ID = "(status || '') = 'PENDING'"
ACQUIRE_IDS = _ACQUIRE.format(
    pending=_PENDING_BY_ID, match="id = ANY($5::bigint[])", columns=_COLUMNS
)
# One id (every notification at low load): a compare-and-set on the row itself. The same
# conditions as above, without the subquery's separate row lock, which costs a WAL record
# and ~0.2 ms per acquire (bench D). Locking one row, the statement holds nothing while it
# waits, so it cannot deadlock: if another transaction holds the row, it waits for that
# one to finish and, under READ COMMITTED, re-checks the conditions on the row's newest
# version, so an attempt taken meanwhile (retry_count and due moved) is not taken again.
ACQUIRE_ONE = f"""
UPDATE tasks SET retry_count = retry_count + 1,
    due = $1::float8 + timeout + coalesce(($3::float8[])[retry_count + 2], $4::float8),
    modified = $1::float8
WHERE id = $5::bigint AND {_PENDING_BY_ID} AND due <= $1::float8 AND retry_count <= $2::int
RETURNING {_COLUMNS}
"""
ACQUIRE_DUE = _ACQUIRE.format(
    pending="status = 'PENDING'", match="TRUE ORDER BY due LIMIT $5::int", columns=_COLUMNS
)
RECORD = """
UPDATE tasks AS t SET status = o.status, due = o.due, modified = $7::float8,
    last_status = o.code, last_error = o.error
FROM unnest($1::bigint[], $2::int[], $3::text[], $4::float8[], $5::int[], $6::text[])
    AS o(id, attempt, status, due, code, error)
WHERE t.id = o.id AND t.retry_count = o.attempt AND (t.status || '') = 'PENDING'
RETURNING t.id, t.retry_count
"""


def headers_json(headers: list[tuple[str, str]]) -> str:
    return json.dumps(headers) if headers else "[]"


async def _no_reset(connection: Any) -> None:
    """Pool release without asyncpg's reset query: the hot statements leave no state."""


class DirectConnections:
    """asyncpg connections for the hot statements: a small pool of ntorque's own, or,
    behind pgbouncer (NullPool), the driver connection of one of SQLAlchemy's."""

    def __init__(self, engine: AsyncEngine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._own = settings.pool_class != "NullPool"
        self._pool: Any = None
        self._pool_lock = asyncio.Lock()

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """An asyncpg connection for the hot statements; driver errors become ours.

        Each hot statement is a single statement run outside a transaction block, so it is
        its own transaction: atomic, and committed (WAL flushed) before asyncpg returns.
        That saves the BEGIN and COMMIT round trips of an explicit transaction.
        """
        import asyncpg

        broken = (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError)
        if not self._own:
            async with self.engine.connect() as conn:
                fairy = await conn.get_raw_connection()
                try:
                    yield fairy.driver_connection
                except broken as exc:
                    # The connection is broken or in doubt: the pool must not hand it out.
                    fairy.invalidate(exc)
                    raise self._unavailable(exc) from exc
                except asyncpg.PostgresError as exc:
                    raise self._unavailable(exc) from exc
                except asyncio.CancelledError:
                    # Given up mid-statement: in doubt, and closing it gracefully would wait
                    # for the server. Invalidated here (outside SQLAlchemy's greenlet), it
                    # is terminated at once.
                    fairy.invalidate()
                    raise
            return
        # No acquire timeout: it would cost a task per call. Connecting is bounded by the
        # connect timeout, and the pool is larger than the few flushes that share it.
        pool = self._pool if self._pool is not None else await self._open_pool()
        try:
            raw = await pool.acquire()
        except (*broken, asyncpg.PostgresError) as exc:
            raise self._unavailable(exc) from exc
        try:
            yield raw
        except broken as exc:
            raw.terminate()  # a closed connection leaves the pool when released
            raise self._unavailable(exc) from exc
        except asyncio.CancelledError:
            # Given up mid-statement (the web's database deadline): released as it is, the
            # connection would first wait for asyncpg's cancel request to reach the server,
            # for ever with the server black-holed (measured). It is in doubt anyway:
            # closed, it leaves the pool at once.
            raw.terminate()
            raise
        except asyncpg.PostgresError as exc:
            raise self._unavailable(exc) from exc
        finally:
            await pool.release(raw)

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        # A statement past its timeout raises a TimeoutError that says nothing by itself.
        reason = str(exc) or f"no answer within {self.settings.db_timeout_s:g} s"
        return StoreUnavailable(f"{type(exc).__name__}: {reason}")

    async def _open_pool(self) -> Any:
        """A small asyncpg pool of our own for the hot statements, opened on first use.

        Checking a connection out of SQLAlchemy's pool and back costs about 115 us of CPU
        per statement here, against about 25 us for asyncpg's pool with no reset query
        (bench/). The hot statements leave no session state behind (no SET, LISTEN or
        advisory lock, no open transaction), so a connection needs no reset.
        """
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    import asyncpg

                    cargs, cparams = self.engine.dialect.create_connect_args(self.engine.url)
                    for sqlalchemy_only in (
                        "prepared_statement_cache_size",
                        "prepared_statement_name_func",
                        "async_fallback",
                        "async_creator_fn",
                    ):
                        cparams.pop(sqlalchemy_only, None)
                    # The same connect arguments as db.create_engine gives SQLAlchemy.
                    cparams.update(db.asyncpg_connect_args(self.settings))
                    # asyncpg prepares each statement once per connection, and PostgreSQL may
                    # then keep a generic plan made while the table was empty: a sequential
                    # scan, which costs milliseconds per batch once the table has grown
                    # (bench D after C: 8 ms per acquire with autovacuum off). None of these
                    # statements ever wants one, and this pool runs nothing else.
                    cparams["server_settings"] = {
                        **cparams.get("server_settings", {}),
                        "enable_seqscan": "off",
                    }
                    self._pool = await asyncpg.create_pool(
                        *cargs,
                        min_size=0,
                        max_size=self.settings.pool_size or 10,
                        reset=_no_reset,
                        **cparams,
                    )
        return self._pool
