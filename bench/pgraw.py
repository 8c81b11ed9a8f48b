"""The database ceiling: asyncpg single-row INSERT + COMMIT from 32 connections.

``python -m bench.pgraw --dsn DSN --seconds S`` prints inserts/s as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import asyncpg

from bench import fastloop

DDL = """
CREATE TABLE IF NOT EXISTS bench_raw (
    id bigserial PRIMARY KEY, url text NOT NULL, body bytea NOT NULL,
    status varchar(16) NOT NULL, due double precision NOT NULL
)
"""
INSERT = "INSERT INTO bench_raw (url, body, status, due) VALUES ($1, $2, $3, $4) RETURNING id"


async def measure(dsn: str, seconds: float, connections: int) -> float:
    setup = await asyncpg.connect(dsn)
    await setup.execute(DDL)
    await setup.close()
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    done = 0
    deadline = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        async with pool.acquire() as conn:
            while time.monotonic() < deadline:
                # One statement outside a transaction block: an insert and its commit.
                await conn.fetchval(INSERT, "http://127.0.0.1/hook", b'{"n": 1}', "PENDING", 0.0)
                done += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(connections)))
    elapsed = time.monotonic() - started
    await pool.close()
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps({"rate": fastloop.run(measure(args.dsn, args.seconds, args.connections))}))


if __name__ == "__main__":
    main()
