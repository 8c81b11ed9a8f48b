"""Scaled out as on Heroku: two web dynos (one with WEB_CONCURRENCY=2), two workers and three
clocks on one PostgreSQL and Redis, cleaning up with no retention (NTORQUE_CLEANUP_AFTER_DAYS=0).

Clocks requeue, fail exhausted tasks and clean up at the same moments: every attempt runs
once, after its backoff, no pending task is deleted, and each task failed by a clock is
counted by that clock alone.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path

import pytest

from tests.acceptance.harness import (
    Api,
    HookServer,
    Processes,
    create_app,
    get_text,
    metric_total,
    procfile_env,
    start_role,
    start_web,
    wait_for,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

MIN_DELAY_S = 0.3


def backoff_s(retry: int) -> float:
    return float(min(MIN_DELAY_S * 2 ** (retry - 1), 1.0))


async def test_three_clocks_with_two_workers_and_two_webs(
    processes: Processes, hook: HookServer, pg_url: str, redis_channel: str, tmp_path: Path
) -> None:
    env = procfile_env(
        tmp_path,
        pg_url,
        redis_channel,
        NTORQUE_CLEANUP_AFTER_DAYS="0",
        NTORQUE_CLEANUP_BATCH="7",
        NTORQUE_REQUEUE_INTERVAL="0.1",
        NTORQUE_REQUEUE_BATCH="10",
        NTORQUE_NOTIFY_BACKLOG_LIMIT="30",
        NTORQUE_MIN_DUE_DELAY=str(MIN_DELAY_S),
        NTORQUE_MAX_DUE_DELAY="1",
        NTORQUE_MAX_RETRIES="2",
        NTORQUE_DEFAULT_TIMEOUT="2",
    )
    key = await create_app(processes, env)
    bases = [
        await start_web(processes, {**env, "WEB_CONCURRENCY": "2"}, name="web1"),
        await start_web(processes, env, name="web2"),
    ]
    apis = [Api(base, key) for base in bases]
    clocks = await asyncio.gather(
        *(start_role(processes, "clock", env, f"clock{i}") for i in range(3))
    )
    workers = await asyncio.gather(
        *(start_role(processes, "worker", env, f"worker{i}") for i in range(2))
    )
    try:
        # Given tasks that complete at once, or after two retries (pending in between).
        expected: dict[int, int] = {}
        for i, (path, attempts) in enumerate([("/ok", 1), ("/flaky/2", 3)] * 2):
            ids = await apis[i % 2].enqueue_many(hook.url + path, 20, parallel=10)
            expected.update(dict.fromkeys(ids, attempts))
        # Then each runs exactly its attempts, one at a time, each retry after its backoff.
        calls = sum(expected.values())
        await wait_for(lambda: len(hook.deliveries) >= calls, 60, f"{calls} hook calls", 0.1)
        for task_id, attempts in expected.items():
            tried = sorted(
                (d for d in hook.deliveries if d.task_id == task_id), key=lambda d: d.received
            )
            assert [d.retry_count for d in tried] == list(range(attempts)), (task_id, tried)
            for before, after in itertools.pairwise(tried):
                assert before.finished is not None
                waited = after.received - before.finished
                assert waited >= backoff_s(after.retry_count) - 0.02, (task_id, waited)

        # Given tasks whose last attempt hangs in a worker that is killed mid-call.
        hanging = await asyncio.gather(
            *(apis[0].enqueue(hook.url + "/hang/2", timeout=3) for _ in range(15))
        )
        await wait_for(
            lambda: (
                sum(1 for d in hook.deliveries if d.path.startswith("/hang") and d.retry_count == 2)
                >= len(hanging)
            ),
            30,
            "every last attempt in flight",
            0.05,
        )
        for worker in workers:
            worker.signal(signal.SIGKILL)
        killed_at = time.monotonic()

        # Then once the leases run out the three clocks fail them, each counted once.
        async def clocks_failed() -> float:
            texts = [await get_text(clock.metrics_url or "") for clock in clocks]
            return sum(metric_total(text, "ntorque_tasks_failed_total") for text in texts)

        for _ in range(200):
            if await clocks_failed() >= len(hanging) or time.monotonic() - killed_at > 20:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)  # a clock counting twice would count by now
        assert await clocks_failed() == len(hanging)
        # And, finished, every task is cleaned up; no process saw an error.
        for task_id in [*expected, *hanging]:
            for _ in range(50):
                response = await apis[1].client.get(f"/tasks/{task_id}")
                if response.status_code == 404:
                    break
                await asyncio.sleep(0.1)
            assert response.status_code == 404, response.text
    finally:
        for api in apis:
            await api.close()
    # Web and clocks still running, and no process logged an error.
    for proc in processes.started:
        if proc not in workers and not proc.name.startswith("create-app"):
            assert proc.returncode is None, proc.name
        assert " ERROR " not in proc.output() and "Traceback" not in proc.output(), proc.name
