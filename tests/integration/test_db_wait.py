"""The web waiting on a slow or silent database: a prompt 503, and no task stored after it."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest

from ntorque.settings import Settings
from ntorque.store import Store
from tests.conftest import backend_param
from tests.support import FreezingProxy, api_client, count_tasks, make_env, new_task

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


@pytest.mark.parametrize("pool_class", ["QueuePool", "NullPool"])
async def test_a_task_read_from_a_black_holed_database_is_answered_503_within_the_timeout(
    pg_url: str, store: Store, pool_class: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the web reaching PostgreSQL through a proxy, and a task
    task = (await store.add_tasks([new_task("http://127.0.0.1:9/x")]))[0]
    proxy, proxied_url = await FreezingProxy.in_front_of(pg_url)
    env = {
        **make_env(
            NTORQUE_AUTHENTICATE="false", NTORQUE_DB_TIMEOUT="1", NTORQUE_AUTO_MIGRATE="false"
        ),
        "DATABASE_URL": proxied_url,
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
    proxy, proxied_url = await FreezingProxy.in_front_of(pg_url)
    env = {
        **make_env(
            NTORQUE_AUTHENTICATE="true",
            NTORQUE_DB_TIMEOUT="1",
            NTORQUE_AUTO_MIGRATE="false",
            NTORQUE_AUTH_CACHE_SECONDS="0",
        ),
        "DATABASE_URL": proxied_url,
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


async def test_enqueues_stuck_on_a_silent_database_free_the_web_once_it_answers_again(
    pg_url: str, store: Store
) -> None:
    # Given the web reaching PostgreSQL through a proxy, enqueues working
    proxy, proxied_url = await FreezingProxy.in_front_of(pg_url)
    env = {
        **make_env(
            NTORQUE_AUTHENTICATE="false", NTORQUE_DB_TIMEOUT="1", NTORQUE_AUTO_MIGRATE="false"
        ),
        "DATABASE_URL": proxied_url,
    }
    try:
        async with api_client(Settings.from_env(env)) as client:

            async def enqueue(n: int) -> httpx.Response:
                return await client.post("/", params={"url": f"http://127.0.0.1:9/{n}"})

            # with three connections open: three inserts held at once behind a table lock
            lock = await asyncpg.connect(pg_url)
            try:
                async with lock.transaction():
                    await lock.execute("LOCK TABLE tasks IN EXCLUSIVE MODE")
                    held = []
                    for n in range(3):
                        held.append(asyncio.create_task(enqueue(n)))
                        await asyncio.sleep(0.05)
            finally:
                await lock.close()
            assert [(await a).status_code for a in held] == [201] * 3
            # When the database goes silent (its open connections dead for good, as after
            # a failover) under more enqueues than the web has group commits (3)
            proxy.frozen = True
            answers = []
            for n in range(1, 7):
                answers.append(asyncio.create_task(enqueue(n)))
                await asyncio.sleep(0.05)  # each its own flush while one is free
            assert [(await a).status_code for a in answers] == [503] * 6
            # And answers again on new connections
            proxy.frozen = False
            # Then the inserts stuck on the dead connections are given up within the
            # database timeout, and enqueues succeed again: not 503s until the driver's
            # own 30 s statement timeout
            started = time.monotonic()
            statuses = []
            while time.monotonic() - started < 10:
                answer = await enqueue(99)
                statuses.append(answer.status_code)
                if answer.status_code == 201:
                    break
                await asyncio.sleep(0.2)
            waited = time.monotonic() - started
            assert statuses[-1] == 201, statuses
            assert waited < 3.5, f"first 201 after {waited:.2f}s (NTORQUE_DB_TIMEOUT=1)"
    finally:
        await proxy.close()
