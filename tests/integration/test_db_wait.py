"""The web waiting on a slow or silent database: a prompt 503, and no task stored after it."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import httpx
import pytest
import sqlalchemy as sa

from ntorque.settings import Settings
from ntorque.store import Store
from tests.conftest import backend_param
from tests.support import api_client, count_tasks, make_env, new_task

pytestmark = [
    pytest.mark.parametrize("backend", [backend_param("postgres-redis")], indirect=True),
    pytest.mark.ntorque_env(NTORQUE_AUTHENTICATE="false", NTORQUE_DB_TIMEOUT="0.5"),
]


async def test_an_enqueue_answered_503_while_its_insert_waited_is_not_stored_later(
    pg_url: str, store: Store
) -> None:
    # Given the tasks table locked, so that every insert waits behind the lock
    lock = await asyncpg.connect(pg_url)
    try:
        tx = lock.transaction()
        await tx.start()
        await lock.execute("LOCK TABLE tasks IN EXCLUSIVE MODE")
        async with api_client(store.settings, store) as client:

            async def enqueue(n: int) -> httpx.Response:
                return await client.post("/", params={"url": f"http://127.0.0.1:9/{n}"})

            # When more enqueues arrive than there are flushes (3): the first three are
            # each under way in a flush, the last two wait in the queue for one
            answers = []
            for n in range(5):
                answers.append(asyncio.create_task(enqueue(n)))
                await asyncio.sleep(0.05)
            statuses = [(await a).status_code for a in answers]
            # Then all are answered 503 within the database timeout
            assert statuses == [503] * 5
            # And once the lock goes, only the inserts already under way may commit: the
            # queued ones were given up by their requests, which told the client to retry
            await tx.rollback()
            await asyncio.sleep(1.0)
            assert (await client.get("/")).status_code == 200
            stored = await count_tasks(store)
            assert stored <= 3, f"{stored} tasks stored for 5 requests answered 503"
            # And the web serves normally afterwards
            assert (await enqueue(9)).status_code == 201
    finally:
        await lock.close()


class FreezingProxy:
    """A TCP proxy to PostgreSQL that can go silent: from ``freeze()`` on, nothing it holds
    or accepts is passed on (a server gone behind a black hole, its connections open)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if self.frozen:
                    return  # swallowed, and nothing more is passed on this way
                writer.write(data)
                await writer.drain()
            writer.close()  # the end of one side, passed on

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if self.frozen:
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.append(up_writer)
        for pipe in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            task = asyncio.create_task(pipe)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.parametrize("pool_class", ["QueuePool", "NullPool"])
async def test_a_task_read_from_a_black_holed_database_is_answered_503_within_the_timeout(
    pg_url: str, store: Store, pool_class: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the web reaching PostgreSQL through a proxy, and a task
    task = (await store.add_tasks([new_task("http://127.0.0.1:9/x")]))[0]
    url = sa.make_url(pg_url)
    proxy = FreezingProxy(url.port or 5432)
    port = await proxy.start()
    env = {
        **make_env(
            NTORQUE_AUTHENTICATE="false", NTORQUE_DB_TIMEOUT="1", NTORQUE_AUTO_MIGRATE="false"
        ),
        "DATABASE_URL": url.set(port=port).render_as_string(hide_password=False),
        "SQLALCHEMY_POOL_CLASS": pool_class,
    }
    try:
        async with api_client(Settings.from_env(env)) as client:
            assert (await client.get(f"/tasks/{task.id}")).status_code == 200
            # When the database goes silent, its connections left open
            proxy.frozen = True
            started = time.monotonic()
            answer = await client.get(f"/tasks/{task.id}")
            waited = time.monotonic() - started
            # Then the read is answered 503 in JSON within the timeout, not seconds after it
            assert answer.status_code == 503 and answer.json()["code"] == "unavailable"
            assert waited < 1.6, f"answered after {waited:.2f}s (NTORQUE_DB_TIMEOUT=1)"
            # And the log says why, even when the deadline (a bare TimeoutError) ended it
            logged = [r.getMessage() for r in caplog.records if r.name == "ntorque.web"]
            assert logged and not any(m.endswith(": ") for m in logged), logged
            # And once the database answers again, so does the web
            proxy.frozen = False
            answer = await client.get(f"/tasks/{task.id}")
            assert answer.status_code == 200, answer.text
    finally:
        await proxy.close()


async def test_a_key_lookup_stuck_on_a_silent_database_is_given_up_at_the_timeout(
    pg_url: str, store: Store
) -> None:
    # Given authentication on, an app's key not cached, and the web reaching PostgreSQL
    # through a proxy
    _, key = await store.create_app("stuck-lookup")
    url = sa.make_url(pg_url)
    proxy = FreezingProxy(url.port or 5432)
    port = await proxy.start()
    env = {
        **make_env(
            NTORQUE_AUTHENTICATE="true",
            NTORQUE_DB_TIMEOUT="1",
            NTORQUE_AUTO_MIGRATE="false",
            NTORQUE_AUTH_CACHE_SECONDS="0",
        ),
        "DATABASE_URL": url.set(port=port).render_as_string(hide_password=False),
    }
    try:
        async with api_client(Settings.from_env(env), key=key) as client:
            assert (await client.get("/tasks/1")).status_code == 404  # the key works
            # When the database goes silent while the key is looked up (its connection left
            # open, its answer never coming)
            proxy.frozen = True
            assert (await client.get("/tasks/1")).status_code == 503
            # And answers again soon after
            proxy.frozen = False
            # Then the lookup stuck on the silent connection is given up at the timeout
            # (and its connection closed), and a fresh one serves the key: not 503s until
            # the driver's own 30 s statement timeout
            statuses = []
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                answer = await client.get("/tasks/1")
                statuses.append(answer.status_code)
                if answer.status_code == 404:
                    break
                await asyncio.sleep(0.2)
            assert statuses[-1] == 404, statuses
    finally:
        await proxy.close()
