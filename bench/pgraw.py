"""The database's own limits: asyncpg single-row INSERT + COMMIT.

``python -m bench.pgraw --dsn DSN --seconds S`` prints the rate from 32 connections as JSON.
``--rate R`` instead commits from one connection at a steady R per second and prints the
commit latency's p50 / p99 / max: the floor under D, whose every task waits for two commits
(the enqueue's and the acquire's), so the disk's stalls show in D's tail whatever runs above.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import asyncpg

from bench import fastloop
from bench.loadgen import percentile

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


async def steady(dsn: str, seconds: float, rate: float) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    await conn.execute(DDL)
    latencies: list[float] = []
    started = time.monotonic()
    for i in range(int(seconds * rate)):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        t0 = time.monotonic()
        await conn.fetchval(INSERT, "http://127.0.0.1/hook", b'{"n": 1}', "PENDING", 0.0)
        latencies.append(time.monotonic() - t0)
    await conn.close()
    return {
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies) * 1000,
        "over_10ms": sum(1 for v in latencies if v > 0.010),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=float, help="commit latency at this steady rate instead")
    args = parser.parse_args()
    if args.rate:
        print(json.dumps(fastloop.run(steady(args.dsn, args.seconds, args.rate))))
        return
    print(json.dumps({"rate": fastloop.run(measure(args.dsn, args.seconds, args.connections))}))


if __name__ == "__main__":
    main()
