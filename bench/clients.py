"""Hook-client comparison: one client library, 32 concurrent POSTs against the hook server.

``python -m bench.clients --client aiohttp|httpx|httpx-aiohttp --url URL --n N`` prints
requests/s as JSON. The orchestrator runs each client in a fresh process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from bench import fastloop

BODY = b'{"n": 1, "kind": "bench"}'
HEADERS = {"Content-Type": "application/json", "NTORQUE-TASK-RETRY-COUNT": "0"}
CLIENTS = ("aiohttp", "httpx", "httpx-aiohttp")


async def _drive(call: Callable[[], Awaitable[int]], n: int, concurrency: int) -> float:
    counter = iter(range(n))
    bad = 0

    async def client() -> None:
        nonlocal bad
        for _ in counter:
            if await call() != 200:
                bad += 1

    # Warm the pool first: connection set-up is not what we compare.
    await asyncio.gather(*(call() for _ in range(concurrency)))
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    if bad:
        raise SystemExit(f"{bad} requests failed")
    return n / elapsed


async def measure(name: str, url: str, n: int, concurrency: int) -> float:
    if name == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=max(concurrency, 10), limit_per_host=0)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        ) as session:

            async def call() -> int:
                async with session.post(url, data=BODY, headers=HEADERS) as resp:
                    await resp.content.read(65536)
                    return resp.status

            return await _drive(call, n, concurrency)
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if name == "httpx":
        client: httpx.AsyncClient = httpx.AsyncClient(limits=limits)
    else:
        from httpx_aiohttp import HttpxAiohttpClient

        client = HttpxAiohttpClient(limits=limits)
    async with client:

        async def call() -> int:
            resp = await client.post(url, content=BODY, headers=HEADERS)
            return resp.status_code

        return await _drive(call, n, concurrency)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", choices=CLIENTS, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    rate = fastloop.run(measure(args.client, args.url, args.n, args.concurrency))
    print(json.dumps({"client": args.client, "rate": rate}))


if __name__ == "__main__":
    main()
