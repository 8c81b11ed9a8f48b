"""An enqueue answered 503 because the database was slow never stores its task afterwards."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest

from ntorque.store import Store
from tests.conftest import backend_param
from tests.support import api_client, count_tasks

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
