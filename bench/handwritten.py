"""The yardstick: the straightforward hand-written pipeline ntorque's targets are set against.

What a team would write in an afternoon with the same libraries: Starlette + asyncpg INSERT
+ RPUSH for the web side; a worker of N coroutines each doing BLPOP -> acquire by id (one
UPDATE ... RETURNING, so still at least once with a lease) -> aiohttp POST -> UPDATE. No
authentication, no validation, no metrics, no batching: everything ntorque adds on top is
left out, so the comparison flatters this side.

    uvicorn bench.handwritten:app            # web (DATABASE_URL, REDIS_URL, BENCH_CHANNEL)
    python -m bench.handwritten worker       # worker

It records into its own table ``hand_tasks`` and Redis list ``$BENCH_CHANNEL``, and sends
``NTORQUE-TASK-ID`` so that bench.hookserver times its deliveries as it times ntorque's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
from redis import asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench import fastloop

SCHEMA = """
CREATE TABLE IF NOT EXISTS hand_tasks (
    id bigserial PRIMARY KEY,
    url text NOT NULL,
    method text NOT NULL,
    timeout int NOT NULL,
    body bytea NOT NULL,
    content_type text,
    status text NOT NULL,
    retry_count int NOT NULL,
    due float8 NOT NULL,
    created float8 NOT NULL,
    modified float8 NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_hand_tasks_pending_due ON hand_tasks (due)
    WHERE status = 'PENDING';
"""
INSERT = """
INSERT INTO hand_tasks (url, method, timeout, body, content_type, status, retry_count, due,
                        created, modified)
VALUES ($1, 'POST', 60, $2, $3, 'PENDING', 0, $4, $4, $4) RETURNING id
"""
ACQUIRE = """
UPDATE hand_tasks SET retry_count = retry_count + 1, due = $2 + timeout + 2, modified = $2
WHERE id = $1 AND status = 'PENDING' AND due <= $2
RETURNING id, url, method, body, content_type, retry_count
"""
FINISH = """
UPDATE hand_tasks SET status = $3, modified = $4
WHERE id = $1 AND retry_count = $2 AND status = 'PENDING'
"""


def _dsn() -> str:
    return os.environ["DATABASE_URL"].replace("+asyncpg", "")


def _channel() -> str:
    return os.environ.get("BENCH_CHANNEL", "hand")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    app.state.pool = await asyncpg.create_pool(_dsn(), min_size=1, max_size=10)
    app.state.redis = aioredis.Redis.from_url(os.environ["REDIS_URL"])
    try:
        yield
    finally:
        await app.state.pool.close()
        await app.state.redis.aclose()


async def enqueue(request: Request) -> JSONResponse:
    url = request.query_params["url"]
    body = await request.body()
    now = time.time()
    task_id = await request.app.state.pool.fetchval(
        INSERT, url, body, request.headers.get("content-type"), now
    )
    await request.app.state.redis.rpush(_channel(), task_id)
    return JSONResponse({"id": task_id, "status": "PENDING"}, status_code=201)


app = Starlette(routes=[Route("/", enqueue, methods=["POST"])], lifespan=lifespan)


async def work(concurrency: int) -> None:
    pool = await asyncpg.create_pool(_dsn(), min_size=1, max_size=10)
    redis = aioredis.Redis.from_url(os.environ["REDIS_URL"], max_connections=concurrency + 1)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)

    async def one_at_a_time() -> None:
        while not stopping.is_set():
            popped = await redis.blpop([_channel()], timeout=1)
            if popped is None:
                continue
            row = await pool.fetchrow(ACQUIRE, int(popped[1]), time.time())
            if row is None:
                continue  # not due, taken or finished
            headers: dict[str, Any] = {
                "NTORQUE-TASK-ID": str(row["id"]),
                "NTORQUE-TASK-RETRY-COUNT": str(row["retry_count"] - 1),
            }
            if row["content_type"]:
                headers["Content-Type"] = row["content_type"]
            try:
                async with session.request(
                    row["method"],
                    row["url"],
                    data=row["body"],
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=60),
                ) as resp:
                    await resp.read()
                    status = "COMPLETED" if resp.status in (200, 201) else "FAILED"
            except aiohttp.ClientError:
                continue  # the lease runs out and the task becomes due again
            await pool.execute(FINISH, row["id"], row["retry_count"], status, time.time())

    try:
        await asyncio.gather(*(one_at_a_time() for _ in range(concurrency)))
    finally:
        await session.close()
        await redis.aclose()
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("worker",))
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    fastloop.run(work(args.concurrency))


if __name__ == "__main__":
    main()
