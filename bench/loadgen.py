"""The load generator, in its own process: keep-alive aiohttp clients POSTing small JSON bodies.

``python -m bench.loadgen --target URL --n N [--rate R] [--hook URL --key KEY] --out FILE``
Without ``--hook`` it posts to ``--target`` as is (the bare-ASGI ceiling); with it, it enqueues
ntorque tasks and records each task id with the monotonic time its request was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any
from urllib.parse import quote

import aiohttp

from bench import fastloop


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url = args.target
    if args.hook:
        url = f"{args.target.rstrip('/')}/?url={quote(args.hook, safe='')}"
    headers = {"Content-Type": "application/json"}
    if args.key:
        headers["NTORQUE_API_KEY"] = args.key
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    latencies: list[float] = []
    sent: list[tuple[int, float]] = []
    errors: list[str] = []
    counter = iter(range(args.n))
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(i: int) -> None:
            body = json.dumps({"n": i, "kind": "bench"}).encode()
            t0 = time.monotonic()
            try:
                async with session.post(url, data=body) as resp:
                    payload = await resp.read()
                    ok = resp.status in (200, 201)
            except aiohttp.ClientError as exc:
                errors.append(repr(exc))
                return
            t1 = time.monotonic()
            if not ok:
                errors.append(f"{resp.status} {payload[:200]!r}")
                return
            latencies.append(t1 - t0)
            if args.hook:
                sent.append((json.loads(payload)["id"], t0))

        async def client() -> None:
            for i in counter:
                await one(i)

        started_wall = time.time()
        started = time.monotonic()
        if args.rate:
            # Open loop: request i is sent at started + i / rate, whatever the answers do.
            gate = asyncio.Semaphore(args.concurrency)
            jobs = []
            for i in range(args.n):
                delay = started + i / args.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await gate.acquire()
                job = asyncio.create_task(one(i))
                job.add_done_callback(lambda _: gate.release())
                jobs.append(job)
            await asyncio.gather(*jobs)
        else:
            await asyncio.gather(*(client() for _ in range(args.concurrency)))
        finished = time.monotonic()
    return {
        "n": args.n,
        "ok": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "started": started,
        "started_wall": started_wall,
        "finished": finished,
        "rate": len(latencies) / (finished - started),
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "sent": sent,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--hook")
    parser.add_argument("--key")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = fastloop.run(run(args))
    with open(args.out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
