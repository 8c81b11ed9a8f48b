"""libpq query parameters in ``DATABASE_URL`` reach every PostgreSQL connection ntorque opens.

SQLAlchemy's asyncpg dialect would pass a URL's query parameters to ``asyncpg.connect`` as
keyword arguments, so ``?application_name=…`` used to crash every process. Here a real
``ntorque migrate`` and a real store run on an empty database created for the test, with
a URL carrying the honoured parameters, and the server is asked what it saw.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa

from ntorque.models import Outcome
from ntorque.store import Store
from tests import support

pytestmark = pytest.mark.postgres

NTORQUE = Path(sys.executable).parent / "ntorque"
ADMIN = dict(host=support.PG_HOST, port=support.PG_PORT, user=support.PG_USER, timeout=10)
APP_NAME = "ntorque_test"
QUERY = f"sslmode=disable&application_name={APP_NAME}&connect_timeout=5"
# Every honoured parameter at once; options as libpq users write it (percent-encoded).
FULL_QUERY = f"{QUERY}&options=-c%20statement_timeout%3D12345&target_session_attrs=read-write"


def _run(
    tmp_path: Path, database_url: str, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(support.FAST_ENV)
    env.update({"DATABASE_URL": database_url, "NTORQUE_SQLITE_PATH": str(tmp_path / "no.db")})
    env.update(extra_env or {})
    return subprocess.run(
        [str(NTORQUE), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90
    )


@pytest.fixture
async def empty_db() -> AsyncIterator[str]:
    """A new, unmigrated database's URL (``postgres://`` as Heroku gives it), dropped after."""
    # The conftest's prefix and our pid: a dead session's leftover is dropped by the next one.
    name = f"ntorque_t_{os.getpid()}_dburl_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database="postgres", **ADMIN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgres://{support.PG_USER}@{support.PG_HOST}:{support.PG_PORT}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _application_names(database: str) -> list[str]:
    admin = await asyncpg.connect(database="postgres", **ADMIN)
    try:
        rows = await admin.fetch(
            "SELECT application_name FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await admin.close()
    return [r["application_name"] for r in rows]


def test_migrate_and_create_app_with_libpq_parameters(tmp_path: Path, empty_db: str) -> None:
    url = f"{empty_db}?{FULL_QUERY}"
    migrate = _run(tmp_path, url, "migrate")
    assert migrate.returncode == 0, migrate.stderr
    assert "Traceback" not in migrate.stderr
    created = _run(tmp_path, url, "create-app", "--name", "dburl")
    assert created.returncode == 0, created.stderr
    assert not (tmp_path / "no.db").exists(), "the URL was used, not the SQLite default"


@pytest.mark.parametrize("pool_class", ["default", "NullPool"])
async def test_store_round_trip_with_libpq_parameters(empty_db: str, pool_class: str) -> None:
    env = {"DATABASE_URL": f"{empty_db}?{FULL_QUERY}"}
    if pool_class != "default":
        env["SQLALCHEMY_POOL_CLASS"] = pool_class  # the hot statements then use SQLAlchemy's
    settings = support.make_settings(env)
    database = empty_db.rsplit("/", 1)[1]
    from ntorque.store import open_store

    store: Store = await open_store(settings)  # migrates (NTORQUE_AUTO_MIGRATE) first
    try:
        app, _key = await store.create_app("round-trip")
        [task] = await store.add_tasks([support.new_task("http://127.0.0.1:9/h", app_id=app.id)])
        [taken] = await store.acquire([task.id])
        outcome = Outcome(
            task_id=taken.id,
            attempt=taken.retry_count,
            status="COMPLETED",
            due=taken.due,
            status_code=200,
            error=None,
        )
        assert await store.record([outcome]) == [True]
        done = await store.get_task(task.id, app.id)
        assert done is not None and done.status == "COMPLETED"

        # The server saw the URL's parameters on both kinds of connection: SQLAlchemy's
        # engine, and the asyncpg connections of the hot statements (store._pg).
        # pg_stat_activity is read while a connection is checked out: with NullPool none
        # is left open afterwards.
        async with store.engine.connect() as conn:
            name = await conn.scalar(sa.text("SELECT current_setting('application_name')"))
            timeout = await conn.scalar(sa.text("SHOW statement_timeout"))
            names = await _application_names(database)
        assert (name, timeout) == (APP_NAME, "12345ms")
        assert names and set(names) == {APP_NAME}, names
        async with store._pg() as raw:
            name = await raw.fetchval("SELECT current_setting('application_name')")
            timeout = await raw.fetchval("SHOW statement_timeout")
            names = await _application_names(database)
        assert (name, timeout) == (APP_NAME, "12345ms")
        assert names and set(names) == {APP_NAME}, names
    finally:
        await store.close()


def test_unsupported_parameter_stops_the_process(tmp_path: Path, empty_db: str) -> None:
    proc = _run(tmp_path, f"{empty_db}?sslmode=disable&keepalives=1", "migrate")
    assert proc.returncode == 2
    assert "DATABASE_URL" in proc.stderr and "'keepalives'" in proc.stderr
    assert "Traceback" not in proc.stderr, "a configuration error is a message, not a crash"


def test_host_less_url_connects_as_libpq_does(tmp_path: Path, empty_db: str) -> None:
    """``postgres:///name`` (libpq's local server; nTorque 0.4's default) works as given.

    Host, port and user then come from libpq's defaults and PGHOST/PGPORT/PGUSER.
    """
    database = empty_db.rsplit("/", 1)[1]
    pg = {"PGHOST": support.PG_HOST, "PGPORT": str(support.PG_PORT), "PGUSER": support.PG_USER}
    migrate = _run(tmp_path, f"postgres:///{database}", "migrate", extra_env=pg)
    assert migrate.returncode == 0, migrate.stderr
    assert "Traceback" not in migrate.stderr
    created = _run(tmp_path, f"postgresql:///{database}?sslmode=disable", "create-app",
                   "--name", "local", extra_env=pg)  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert not (tmp_path / "no.db").exists(), "the URL was used, not the SQLite default"


@pytest.mark.parametrize("port", ["abc", "99999", "-1"])
def test_bad_port_stops_the_process_naming_the_variable(tmp_path: Path, port: str) -> None:
    proc = _run(tmp_path, f"postgres://postgres@127.0.0.1:{port}/x", "migrate")
    assert proc.returncode == 2, proc.stderr
    assert "DATABASE_URL" in proc.stderr
    assert "Traceback" not in proc.stderr, "a configuration error is a message, not a crash"
