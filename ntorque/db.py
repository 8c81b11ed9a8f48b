"""Engine construction and schema migration: the only place that knows the dialects apart."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, pool
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .settings import Settings, SettingsError

logger = logging.getLogger("ntorque.db")

_POOLS: dict[str, type[pool.Pool]] = {
    "NullPool": pool.NullPool,
    "QueuePool": pool.AsyncAdaptedQueuePool,
    "AsyncAdaptedQueuePool": pool.AsyncAdaptedQueuePool,
}


def create_engine(settings: Settings) -> AsyncEngine:
    """An async engine for ``settings.database_url`` with ntorque's pool and timeouts."""
    # A statement's error never quotes its parameters: they hold task bodies and passthrough
    # headers (secrets, often), and the error is logged.
    kwargs: dict[str, Any] = {"hide_parameters": True}
    if settings.is_sqlite:
        Path(sa.make_url(settings.database_url).database or "").parent.mkdir(
            parents=True, exist_ok=True
        )
        kwargs["connect_args"] = {"timeout": settings.db_timeout_s}
        engine = create_async_engine(settings.database_url, **kwargs)
        _configure_sqlite(engine, settings)
        return engine

    kwargs["connect_args"] = asyncpg_connect_args(settings)
    kwargs["pool_pre_ping"] = False
    if settings.pool_class is not None:
        kwargs["poolclass"] = _POOLS[settings.pool_class]
    if settings.pool_class != "NullPool":
        # Small by default: Heroku's smaller PostgreSQL plans allow 20 connections in all.
        kwargs["pool_size"] = settings.pool_size or 5
        kwargs["max_overflow"] = (
            settings.pool_max_overflow if settings.pool_max_overflow is not None else 5
        )
        kwargs["pool_timeout"] = settings.pool_timeout_s or settings.db_timeout_s
        if settings.pool_recycle_s is not None:
            kwargs["pool_recycle"] = settings.pool_recycle_s
    engine = create_async_engine(settings.database_url, **kwargs)
    _configure_postgres(engine)
    return engine


def asyncpg_connect_args(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of every asyncpg connection ntorque opens to PostgreSQL.

    ntorque's defaults, overridden by what ``DATABASE_URL``'s query string asked for
    (:func:`ntorque.settings.normalise_database_url`); server settings are merged, so
    ``?options=…`` keeps the default application_name. SQLAlchemy's engine and the
    store's own asyncpg pool both connect with these.
    """
    connect_args: dict[str, Any] = {
        # A dead server must answer 503 within seconds, never hang a request.
        "timeout": settings.db_timeout_s,
        "command_timeout": max(settings.db_timeout_s * 6, 30.0),
    }
    server_settings = {"application_name": "ntorque"}
    for key, value in settings.database_connect_args.items():
        if key == "server_settings":
            server_settings.update(value)
        else:
            connect_args[key] = value
    connect_args["server_settings"] = server_settings
    return connect_args


def check_sqlite_file(settings: Settings) -> None:
    """Make sure the embedded SQLite file can be created and written, before a role starts.

    Raises :class:`SettingsError` naming the file, instead of a driver traceback later.
    """
    database = sa.make_url(settings.database_url).database
    if not database or database == ":memory:":
        return
    path = Path(database)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=settings.db_timeout_s, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")
        finally:
            connection.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            return  # writable, and busy with another process's write: it will wait its turn
        raise _unusable(path, exc) from None
    except (OSError, sqlite3.Error) as exc:
        raise _unusable(path, exc) from None


def _unusable(path: Path, exc: Exception) -> SettingsError:
    return SettingsError(
        f"NTORQUE_SQLITE_PATH: cannot create or write the SQLite file {path}: {exc}"
        " (point NTORQUE_SQLITE_PATH, or a sqlite:// DATABASE_URL, at a file in a writable"
        " directory)"
    )


def _configure_postgres(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "checkout")
    def on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        # After a PostgreSQL restart every pooled connection is closed, and asyncpg knows it
        # without a round trip. Replace them all now, before a statement fails on one and a
        # request answers 503 although the database is back (pre-ping would cost a round
        # trip per checkout).
        if dbapi_connection.driver_connection.is_closed():
            raise sa.exc.InvalidatePoolError("the pooled connection was closed")


def _configure_sqlite(engine: AsyncEngine, settings: Settings) -> None:
    busy_ms = int(settings.db_timeout_s * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself, so that every transaction can be IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a task is on disk before its 201, even in WAL mode.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Any) -> None:
        # Take the write lock up front: a deferred transaction that later writes can fail
        # with "database is locked" instead of waiting for busy_timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_dir() -> Path:
    """Where the migrations live: the checkout's alembic/, else the copy inside the wheel."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "alembic", here / "_migrations", Path.cwd() / "alembic"]
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(
        "cannot find the alembic/ migrations directory; run ntorque from its checkout"
    )


def alembic_config(settings: Settings) -> Any:
    from alembic.config import Config

    directory = alembic_dir()
    ini = directory.parent / "alembic.ini"
    config = Config(str(ini)) if ini.is_file() else Config()
    config.set_main_option("script_location", str(directory))
    config.attributes["ntorque_settings"] = settings
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Run ``alembic upgrade`` (blocking; call it outside the event loop or in a thread)."""
    from alembic import command

    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(settings), revision)


async def upgrade_async(settings: Settings) -> None:
    # Alembic's env.py runs its own event loop, so it needs a thread of its own.
    await asyncio.to_thread(upgrade, settings)
