"""Alembic's migrations build exactly the schema ``ntorque.schema`` declares, both ways.

Run as an operator would: the ``alembic`` command (``alembic upgrade head`` from the repo
root with ``DATABASE_URL`` set, as the Procfile's release phase does) and ``ntorque migrate``,
on empty PostgreSQL databases and SQLite files created here and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import create_async_engine

from ntorque.db import alembic_config
from ntorque.schema import metadata
from ntorque.settings import Settings
from tests import support

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PG_ADMIN_DSN = f"postgresql://{support.PG_USER}@{support.PG_HOST}:{support.PG_PORT}/postgres"
COMMAND_TIMEOUT_S = 90


# -- databases created and dropped here --------------------------------------------------


class EmptyDatabases:
    """Creates empty PostgreSQL databases and drops every one of them afterwards."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def create(self) -> str:
        """A new empty database; its URL in the ``postgres://`` form Heroku uses."""
        name = f"ntorque_migration_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self.names.append(name)
        admin = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgres://", 1)
        return f"{admin}/{name}"

    async def drop_all(self) -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
        try:
            for name in self.names:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def driver_url(url: str) -> str:
    """The SQLAlchemy URL ntorque itself derives from ``DATABASE_URL``."""
    return Settings.from_env({"DATABASE_URL": url}).database_url


async def run_command(env: dict[str, str], *args: str) -> str:
    """Run a console command from the repo root with only ``env``; fail loudly on error."""
    full_env = {"PATH": f"{VENV_BIN}{os.pathsep}/usr/bin{os.pathsep}/bin", "LANG": "C.UTF-8", **env}
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=REPO_ROOT,
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{' '.join(args)} did not finish in {COMMAND_TIMEOUT_S}s") from None
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{text}"
    return text


# -- what a database holds ---------------------------------------------------------------


def _diff_and_catalog(sync_conn: Any) -> tuple[list[Any], dict[str, Any]]:
    context = MigrationContext.configure(
        sync_conn, opts={"compare_type": True, "compare_server_default": True}
    )
    diff = compare_metadata(context, metadata)
    return diff, _catalog(sync_conn)


def _catalog(sync_conn: Any) -> dict[str, Any]:
    """Everything autogenerate does not compare: index predicates, checks, exact names."""
    inspector = sa.inspect(sync_conn)
    catalog: dict[str, Any] = {"tables": sorted(inspector.get_table_names())}
    if sync_conn.dialect.name == "postgresql":
        query = {
            "columns": "SELECT table_name, column_name, data_type, character_maximum_length,"
            " numeric_precision, is_nullable, column_default FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name <> 'alembic_version'",
            "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes"
            " WHERE schemaname = 'public' AND tablename <> 'alembic_version'",
            "constraints": "SELECT conrelid::regclass::text, conname, contype,"
            " pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace = 'public'::regnamespace"
            " AND conrelid::regclass::text <> 'alembic_version'",
        }
        for key, sql in query.items():
            catalog[key] = sorted(tuple(row) for row in sync_conn.exec_driver_sql(sql))
    else:
        rows = sync_conn.exec_driver_sql(
            "SELECT type, name, tbl_name, sql FROM sqlite_master"
            " WHERE tbl_name <> 'alembic_version' AND name NOT LIKE 'sqlite_%'"
        )
        # The DDL text is the schema in SQLite; compare it modulo whitespace and the quotes
        # around a table's name (a table rebuilt by a batch migration has them).
        catalog["ddl"] = sorted((r[0], r[1], r[2], _ddl(r[3])) for r in rows)
    return catalog


def _ddl(sql: str | None) -> str:
    text = re.sub(r"\s+", " ", sql or "")
    return re.sub(r'^CREATE TABLE "(\w+)"', r"CREATE TABLE \1", text)


async def inspect_database(url: str) -> tuple[list[Any], dict[str, Any]]:
    engine = create_async_engine(driver_url(url))
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_diff_and_catalog)
    finally:
        await engine.dispose()


async def declared_catalog(url: str) -> dict[str, Any]:
    """The catalog of ``metadata.create_all`` on an empty database: the code's declaration."""
    engine = create_async_engine(driver_url(url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        async with engine.connect() as conn:
            return await conn.run_sync(_catalog)
    finally:
        await engine.dispose()


async def alembic_versions(url: str) -> list[str]:
    engine = create_async_engine(driver_url(url))
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            if "alembic_version" not in tables:
                return []
            rows = await conn.exec_driver_sql("SELECT version_num FROM alembic_version")
            return [r[0] for r in rows]
    finally:
        await engine.dispose()


def head_revision() -> str:
    settings = Settings.from_env({"NTORQUE_SQLITE_PATH": "/nonexistent/x.sqlite3"})
    head = ScriptDirectory.from_config(alembic_config(settings)).get_current_head()
    assert head is not None
    return head


async def assert_builds_declared_schema(url: str, reference_url: str) -> None:
    diff, catalog = await inspect_database(url)
    assert diff == [], f"the migrated schema differs from ntorque.schema: {diff}"
    expected = await declared_catalog(reference_url)
    expected["tables"] = sorted([*expected["tables"], "alembic_version"])
    for key in sorted(set(catalog) | set(expected)):
        got, want = set(catalog.get(key, [])), set(expected.get(key, []))
        assert got == want, (
            f"{key}: only migrated {sorted(got - want)}; only declared {sorted(want - got)}"
        )
    assert await alembic_versions(url) == [head_revision()]


# -- the backends --------------------------------------------------------------------------


class Backend:
    """Fresh empty databases of one kind, as ``DATABASE_URL`` environments."""

    def __init__(self, kind: str, tmp_path: Path, databases: EmptyDatabases | None) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.databases = databases
        self.count = 0

    async def new(self) -> tuple[dict[str, str], str]:
        """(the environment a process gets, the URL for inspection)."""
        if self.kind == "postgres":
            assert self.databases is not None
            url = await self.databases.create()
            return {"DATABASE_URL": url}, url
        self.count += 1
        path = self.tmp_path / f"schema-{self.count}.sqlite3"
        return {"NTORQUE_SQLITE_PATH": str(path)}, f"sqlite:///{path}"


@pytest.fixture(
    params=[pytest.param("postgres", marks=pytest.mark.postgres), pytest.param("sqlite")]
)
async def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "postgres":
        databases = EmptyDatabases()
        try:
            yield Backend("postgres", tmp_path, databases)
        finally:
            await databases.drop_all()
    else:
        yield Backend("sqlite", tmp_path, None)


# -- the tests -------------------------------------------------------------------------------


async def test_alembic_upgrade_head_builds_the_declared_schema(empty_db: Backend) -> None:
    env, url = await empty_db.new()
    _, reference = await empty_db.new()

    await run_command(env, "alembic", "upgrade", "head")

    await assert_builds_declared_schema(url, reference)


async def test_ntorque_migrate_builds_the_declared_schema_and_is_idempotent(
    empty_db: Backend,
) -> None:
    env, url = await empty_db.new()
    _, reference = await empty_db.new()

    await run_command(env, "ntorque", "migrate")
    await run_command(env, "ntorque", "migrate")  # every deploy's release phase runs it again

    await assert_builds_declared_schema(url, reference)


async def test_downgrade_to_base_leaves_no_tables_and_upgrade_works_again(
    empty_db: Backend,
) -> None:
    env, url = await empty_db.new()
    _, reference = await empty_db.new()
    await run_command(env, "alembic", "upgrade", "head")

    await run_command(env, "alembic", "downgrade", "base")

    _, catalog = await inspect_database(url)
    assert catalog["tables"] == ["alembic_version"]
    assert await alembic_versions(url) == []

    await run_command(env, "alembic", "upgrade", "head")
    await assert_builds_declared_schema(url, reference)


async def test_upgrade_keeps_existing_rows(empty_db: Backend) -> None:
    """Re-running the release phase on a database in use changes nothing."""
    env, url = await empty_db.new()
    await run_command(env, "ntorque", "migrate")
    key = (await run_command(env, "ntorque", "create-app", "--name", "kept")).strip().splitlines()
    await run_command(env, "alembic", "upgrade", "head")

    engine = create_async_engine(driver_url(url))
    try:
        async with engine.connect() as conn:
            names = [r[0] for r in await conn.exec_driver_sql("SELECT name FROM applications")]
    finally:
        await engine.dispose()
    assert names == ["kept"]
    assert re.fullmatch(r"[0-9a-f]{40}", key[-1]), key
