"""Alembic environment: migrations run on ntorque's own engine (PostgreSQL or SQLite)."""

from __future__ import annotations

import asyncio
import logging.config

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ntorque.db import create_engine
from ntorque.schema import metadata
from ntorque.settings import Settings

config = context.config
if config.config_file_name is not None and not config.attributes.get("ntorque_settings"):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

settings: Settings = config.attributes.get("ntorque_settings") or Settings.from_env()

# Several dynos may start at once: one migrates, the others wait for it.
MIGRATION_LOCK_ID = 0x6E746F72


def run_migrations(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async() -> None:
    engine = create_engine(settings)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=settings.database_url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_async())
