"""Shared fixtures: real PostgreSQL (a database per test, cloned from a migrated template),
real Redis (a channel per test), SQLite, hook servers and the two backends every store,
notifier, worker and clock test runs against.

Missing services: tests marked ``postgres``/``redis`` (or using ``pg_url``/``redis_channel``
or a production ``backend``) are skipped with one loud summary line; under ``CI=true`` the
session stops at once with exit code 1 instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import queue
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ntorque import db
from ntorque.notify import LocalNotifier, Notifier, PollingNotifier, RedisNotifier
from ntorque.settings import Settings
from ntorque.store import Store
from tests import support
from tests.support import HookServer

T = TypeVar("T")

DB_PREFIX = "ntorque_t_"
SKIP_PREFIX = "ntorque: service missing"

# -- service detection ------------------------------------------------------------------


@dataclasses.dataclass
class Services:
    postgres: str | None = None  # None when reachable, else why not
    redis: str | None = None
    skipped: int = 0

    def missing(self, marks: set[str], detail: bool = True) -> list[str]:
        out = []
        if "postgres" in marks and self.postgres is not None:
            where = f"{support.PG_HOST}:{support.PG_PORT}"
            out.append(f"PostgreSQL ({self.postgres})" if detail else f"PostgreSQL at {where}")
        if "redis" in marks and self.redis is not None:
            where = f"{support.REDIS_HOST}:{support.REDIS_PORT}"
            out.append(f"Redis ({self.redis})" if detail else f"Redis at {where}")
        return out


SERVICES = Services()


def _in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread: asyncio.run and alembic must not meet a running loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def pg_execute(*statements: str, database: str = "postgres") -> list[Any]:
    """Run admin statements (autocommit) on the test server; return the last one's rows."""
    import asyncpg

    async def go() -> list[Any]:
        conn = await asyncpg.connect(
            host=support.PG_HOST,
            port=support.PG_PORT,
            user=support.PG_USER,
            database=database,
            timeout=5,
        )
        try:
            rows: list[Any] = []
            for statement in statements:
                rows = list(await conn.fetch(statement))
            return rows
        finally:
            await conn.close()

    return _in_thread(lambda: asyncio.run(go()))


def _probe_postgres() -> str | None:
    try:
        pg_execute("SELECT 1")
    except Exception as exc:
        return f"{support.PG_HOST}:{support.PG_PORT}: {type(exc).__name__}: {exc}"
    return None


def _probe_redis() -> str | None:
    try:
        with socket.create_connection((support.REDIS_HOST, support.REDIS_PORT), timeout=3) as s:
            s.sendall(b"PING\r\n")
            answer = s.recv(64)
        if not answer.startswith(b"+PONG"):
            return f"{support.REDIS_HOST}:{support.REDIS_PORT} answered {answer[:40]!r}"
    except OSError as exc:
        return f"{support.REDIS_HOST}:{support.REDIS_PORT}: {exc}"
    return None


def _drop_leftovers() -> None:
    """Drop databases a previous, dead test session of ours left behind."""
    rows = pg_execute(
        f"SELECT datname FROM pg_database WHERE datname LIKE '{DB_PREFIX}%' "
        f"OR datname LIKE 'ntorque_tpl_%'"
    )
    for (name,) in rows:
        parts = name.split("_")
        pid = next((int(p) for p in parts if p.isdigit()), None)
        if pid is None or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # its session still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ntorque_env(**env): extra environment for the `settings` fixture"
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    SERVICES.postgres = _probe_postgres()
    SERVICES.redis = _probe_redis()
    missing = SERVICES.missing({"postgres", "redis"})
    if missing and support.ci():
        pytest.exit(
            f"CI=true but {' and '.join(missing)} not reachable: "
            "the PostgreSQL/Redis tests must run in CI, never skip",
            returncode=1,
        )
    if SERVICES.postgres is None:
        try:
            _drop_leftovers()
        except Exception:
            pass  # tidying only; never fail the session for it


def _needs(item: pytest.Item) -> set[str]:
    marks = {m.name for m in item.iter_markers() if m.name in ("postgres", "redis")}
    fixtures = set(getattr(item, "fixturenames", ()))
    if fixtures & {"pg_url", "pg_template", "pg_pool"}:
        marks.add("postgres")
    if "redis_channel" in fixtures:
        marks.add("redis")
    return marks


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        needs = _needs(item)
        for name in needs:
            if not item.get_closest_marker(name):
                item.add_marker(name)
        missing = SERVICES.missing(needs)
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"{SKIP_PREFIX}: {', '.join(missing)}"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if (
        report.skipped
        and report.when == "setup"
        and isinstance(report.longrepr, tuple)
        and str(report.longrepr[2]).startswith(f"Skipped: {SKIP_PREFIX}")
    ):
        SERVICES.skipped += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    missing = SERVICES.missing({"postgres", "redis"}, detail=False)
    if missing and SERVICES.skipped:
        terminalreporter.write_sep(
            "!",
            f"SKIPPED {SERVICES.skipped} tests: {' and '.join(missing)} not reachable "
            "(under CI=true this is an error)",
            red=True,
            bold=True,
        )


def _require(service: str) -> None:
    reason = getattr(SERVICES, service)
    if reason is not None:
        pytest.skip(f"{SKIP_PREFIX}: {service} ({reason})")


# -- PostgreSQL -------------------------------------------------------------------------

_counter = iter(range(1, 10**9))


def _pg(name: str) -> str:
    return f"postgresql://{support.PG_USER}@{support.PG_HOST}:{support.PG_PORT}/{name}"


# What makes a database "as migrated": columns, indexes, constraints, alembic revision.
FINGERPRINT_SQL = """
SELECT string_agg(x, ';' ORDER BY x) FROM (
  SELECT 'c:' || table_name || '.' || column_name || ':' || data_type || ':'
         || coalesce(column_default, '') AS x
    FROM information_schema.columns WHERE table_schema = 'public'
  UNION ALL SELECT 'i:' || indexdef FROM pg_indexes WHERE schemaname = 'public'
  UNION ALL SELECT 'k:' || conname || ':' || pg_get_constraintdef(c.oid)
    FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
   WHERE n.nspname = 'public'
  UNION ALL SELECT 'v:' || version_num FROM alembic_version
) s
"""


class DatabasePool:
    """Per-test databases cloned from the template, recycled when the schema is intact.

    CREATE/DROP DATABASE each cost a few hundred ms of fsync. A used database whose
    schema still matches the template's fingerprint is emptied in the background
    (connections terminated, TRUNCATE … RESTART IDENTITY) and handed to the next test;
    anything else (e.g. a migration test's downgrade) is dropped and a new clone made.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        self.fingerprint = pg_execute(FINGERPRINT_SQL, database=template)[0][0]
        self.tables = [
            r[0]
            for r in pg_execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename <> 'alembic_version'",
                database=template,
            )
        ]
        # Separate threads: recycling and dropping must never delay the clone a test awaits.
        self._creator = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pg-create")
        self._recycler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pg-recycle")
        self._clean: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._returns: list[concurrent.futures.Future[None]] = []

    def _create(self) -> str:
        name = f"{DB_PREFIX}{os.getpid()}_{next(_counter)}"
        pg_execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name

    def take(self) -> str:
        # Recycling (~0.1 s) beats cloning (~0.3 s): wait for the one in progress, if any.
        for pending in self._returns:
            if not pending.done():
                with contextlib.suppress(Exception):
                    pending.result(timeout=30)
        self._returns = [r for r in self._returns if not r.done()]
        try:
            return self._clean.get_nowait()
        except queue.Empty:
            return self._creator.submit(self._create).result(timeout=60)

    def _recycle(self, name: str) -> None:
        try:
            pg_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )
            if pg_execute(FINGERPRINT_SQL, database=name)[0][0] == self.fingerprint:
                tables = ", ".join(f'"{t}"' for t in self.tables)
                pg_execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE", database=name)
                self._clean.put(name)
                return
        except Exception:
            pass  # whatever the test did to it, a drop still cleans up
        pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def give_back(self, name: str) -> None:
        self._returns.append(self._recycler.submit(self._recycle, name))

    def close(self) -> None:
        concurrent.futures.wait(self._returns, timeout=120)
        names = []
        while not self._clean.empty():
            names.append(self._clean.get_nowait())
        for name in names:
            with contextlib.suppress(Exception):
                pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._creator.shutdown(wait=True)
        self._recycler.shutdown(wait=True)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """Name of a session-wide template database, migrated once with alembic."""
    _require("postgres")
    name = f"ntorque_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    pg_execute(f'CREATE DATABASE "{name}"')
    try:
        settings = support.make_settings(DATABASE_URL=_pg(name))
        _in_thread(lambda: db.upgrade(settings))
        yield name
    finally:
        pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_pool(pg_template: str) -> Iterator[DatabasePool]:
    """The session's pool of template clones (see DatabasePool)."""
    pool = DatabasePool(pg_template)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def pg_url(pg_pool: DatabasePool) -> Iterator[str]:
    """URL of a fresh PostgreSQL database for this test, cloned from the migrated template
    (``CREATE DATABASE … TEMPLATE``) and dropped after it."""
    name = pg_pool.take()
    try:
        yield _pg(name)
    finally:
        pg_pool.give_back(name)


# -- SQLite -----------------------------------------------------------------------------


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    """Path of a not-yet-existing SQLite file in this test's tmp_path."""
    return tmp_path / "ntorque.sqlite3"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each sqlite backend test (alembic runs once)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.sqlite3"
    settings = support.make_settings(NTORQUE_SQLITE_PATH=str(path))
    _in_thread(lambda: db.upgrade(settings))
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


# -- Redis ------------------------------------------------------------------------------


@pytest.fixture
def redis_channel() -> Iterator[str]:
    """A unique Redis list name (``ntorque-test:<uuid>``); its keys are deleted afterwards."""
    import redis

    _require("redis")
    channel = f"ntorque-test:{uuid.uuid4().hex}"
    yield channel
    client = redis.Redis(host=support.REDIS_HOST, port=support.REDIS_PORT, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{channel}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# -- backends ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backend:
    """A store dialect plus a notifier kind, and the settings that select them."""

    db: str  # "sqlite" | "postgres"
    notify: str  # "local" | "redis" | "poll"
    settings: Settings

    @property
    def name(self) -> str:
        return f"{self.db}-{self.notify}"


def backend_param(name: str) -> Any:
    """``pytest.param`` for a backend name such as "postgres-redis", with its service marks."""
    db_kind, notify = name.split("-")
    marks = []
    if db_kind == "postgres":
        marks.append(pytest.mark.postgres)
    if notify == "redis":
        marks.append(pytest.mark.redis)
    return pytest.param(name, id=name, marks=marks)


BACKENDS = ("sqlite-local", "postgres-redis")
ALL_BACKENDS = ("sqlite-local", "postgres-redis", "sqlite-poll")


def _marker_env(request: pytest.FixtureRequest) -> dict[str, str]:
    env: dict[str, str] = {}
    # Closest marker last, so a test's own marker beats its module's.
    for marker in reversed(list(request.node.iter_markers("ntorque_env"))):
        env.update({k: str(v) for k, v in marker.kwargs.items()})
    return env


@pytest.fixture(params=[backend_param(n) for n in BACKENDS])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The backend under test: "sqlite-local" (embedded) or "postgres-redis" (production).

    Its settings are FAST_ENV plus any ``@pytest.mark.ntorque_env(NAME=value)`` overrides;
    the database is migrated. Parametrise indirectly with ``backend_param("sqlite-poll")``.
    """
    db_kind, notify = str(request.param).split("-")
    env = support.make_env()
    if db_kind == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("pg_url")
    else:
        path = tmp_path / "ntorque.sqlite3"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        env["NTORQUE_SQLITE_PATH"] = str(path)
    if notify == "redis":
        env["REDIS_URL"] = support.REDIS_URL
        env["NTORQUE_REDIS_CHANNEL"] = request.getfixturevalue("redis_channel")
    env.update(_marker_env(request))
    return Backend(db=db_kind, notify=notify, settings=Settings.from_env(env))


@pytest.fixture
def settings(backend: Backend) -> Settings:
    """The backend's Settings (a shortcut for ``backend.settings``)."""
    return backend.settings


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    """A Store on the backend's migrated database, closed after the test."""
    the_store = Store.from_settings(settings)
    try:
        yield the_store
    finally:
        await the_store.close()


def notifier_for(backend: Backend) -> Notifier:
    """A new notifier of the backend's kind."""
    if backend.notify == "redis":
        return RedisNotifier(backend.settings)
    if backend.notify == "local":
        return LocalNotifier(backend.settings.notify_backlog_limit)
    return PollingNotifier()


@pytest.fixture
async def notifier(backend: Backend) -> AsyncIterator[Notifier]:
    """The backend's notifier (Redis on the test channel, in-process, or polling); closed after."""
    the_notifier = notifier_for(backend)
    try:
        yield the_notifier
    finally:
        await the_notifier.close()


@pytest.fixture
async def make_store() -> AsyncIterator[Callable[[Settings], Awaitable[Store]]]:
    """Factory: ``await make_store(settings)`` opens (migrating first) a Store, closed after."""
    opened: list[Store] = []

    async def make(settings: Settings) -> Store:
        from ntorque.store import open_store

        the_store = await open_store(settings)
        opened.append(the_store)
        return the_store

    yield make
    for the_store in opened:
        await the_store.close()


@pytest.fixture
async def app_key(store: Store) -> str:
    """The API key of a fresh active app named "test" in the backend's store."""
    _, key = await store.create_app(f"test-{uuid.uuid4().hex[:8]}")
    return key


# -- HTTP -------------------------------------------------------------------------------


@pytest.fixture
async def hook_server() -> AsyncIterator[HookServer]:
    """A recording, scriptable HTTP hook server on 127.0.0.1 (see support.HookServer)."""
    async with support.hook_server_running() as server:
        yield server


@pytest.fixture
async def api(
    settings: Settings, store: Store, notifier: Notifier, app_key: str
) -> AsyncIterator[Any]:
    """An httpx.AsyncClient on the app served by uvicorn, sending ``app_key`` as NTORQUE_API_KEY."""
    async with support.api_client(settings, store, notifier, key=app_key) as client:
        yield client


@pytest.fixture
def deadline() -> Callable[[float], float]:
    """``deadline(s)``: a monotonic time ``s`` seconds from now (for bounded loops)."""
    return lambda seconds: time.monotonic() + seconds
