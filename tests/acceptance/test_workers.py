"""Several worker processes, duplicate notifications, SIGKILLed workers and a backlog past the
notification limit (Procfile lines).

Acquisition is decided in PostgreSQL, so a duplicated doorbell can never make two workers
run the same attempt; the lease (timeout + backoff) brings back what a killed worker held.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from redis import asyncio as aioredis

from tests import support
from tests.acceptance.harness import (
    Api,
    HookServer,
    Proc,
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


async def test_three_workers_fed_duplicate_notifications_never_repeat_an_attempt(
    processes: Processes, hook: HookServer, pg_url: str, redis_channel: str, tmp_path: Path
) -> None:
    # Small concurrency, so that every worker gets a share of the race.
    env = procfile_env(
        tmp_path, pg_url, redis_channel, NTORQUE_WORKER_CONCURRENCY="8", NTORQUE_MAX_RETRIES="3"
    )
    api = Api(await start_web(processes, env), await create_app(processes, env))
    redis = aioredis.Redis.from_url(support.REDIS_URL, socket_timeout=5)
    stop_pushing = asyncio.Event()

    async def push_duplicates(ids: list[int]) -> int:
        """Ring for every task again and again while the workers run (bounded)."""
        pushed = 0
        for _ in range(2000):
            if stop_pushing.is_set():
                break
            if await redis.llen(redis_channel) < 2000:
                await redis.rpush(redis_channel, *ids, *ids)
                pushed += 2 * len(ids)
            await asyncio.sleep(0.05)
        return pushed

    try:
        await start_role(processes, "clock", env, "clock")
        # All three wait on the channel before the first task arrives, so they all race.
        workers: list[Proc] = await asyncio.gather(
            *(start_role(processes, "worker", env, f"worker{i}") for i in range(3))
        )
        # Each task fails twice (attempts 0 and 1), then completes: three attempts each.
        # Every task is rung for five more times as soon as it is stored.
        ids: list[int] = []
        for _ in range(6):
            chunk = await api.enqueue_many(hook.url + "/flaky/2", 10)
            await redis.rpush(redis_channel, *(chunk * 5))
            ids += chunk
        pusher = asyncio.create_task(push_duplicates(ids))
        try:
            await api.wait_status(ids, "COMPLETED", timeout_s=90)
        finally:
            stop_pushing.set()
            pushed = await pusher
    finally:
        await api.close()
        await redis.aclose()

    repeated = {pair: n for pair, n in hook.attempts().items() if n > 1}
    assert not repeated, f"(task id, retry count) pairs performed more than once: {repeated}"
    for task_id in ids:
        assert sorted(d.retry_count for d in hook.deliveries if d.task_id == task_id) == [0, 1, 2]

    acquired = []
    for worker in workers:
        assert worker.metrics_url is not None
        exposition = await get_text(worker.metrics_url)
        acquired.append(metric_total(exposition, "ntorque_tasks_acquired_total"))
    print(f"duplicate notifications: {pushed + 5 * len(ids)}; acquired per worker: {acquired}")
    assert sum(acquired) == 3 * len(ids)
    assert sum(1 for n in acquired if n > 0) >= 2, f"the workers did not race: {acquired}"


async def test_worker_sigkilled_three_times_mid_call_loses_no_task(
    processes: Processes, hook: HookServer, pg_url: str, redis_channel: str, tmp_path: Path
) -> None:
    # A 2 s timeout is the lease: what a killed worker held is due again 2 s later.
    env = procfile_env(
        tmp_path,
        pg_url,
        redis_channel,
        NTORQUE_DEFAULT_TIMEOUT="2",
        NTORQUE_WORKER_CONCURRENCY="10",
        NTORQUE_MAX_RETRIES="20",
    )
    api = Api(await start_web(processes, env), await create_app(processes, env))
    try:
        await start_role(processes, "clock", env, "clock")
        worker = await start_role(processes, "worker", env, "worker")
        ids = await api.enqueue_many(hook.url + "/jitter/50/200", 200)

        in_flight_at_kill = []
        for threshold in (40, 90, 140):
            await wait_for(
                lambda n=threshold: len(hook.per_task()) >= n,
                timeout_s=60,
                message=f"{threshold} tasks delivered",
            )
            in_flight_at_kill.append(sum(1 for d in hook.deliveries if d.finished is None))
            worker.signal(signal.SIGKILL)
            assert await worker.wait(10) == -signal.SIGKILL
            worker = await start_role(processes, "worker", env, "worker")

        await api.wait_status(ids, "COMPLETED", timeout_s=90)
    finally:
        await api.close()

    per_task = hook.per_task()
    missing = sorted(set(ids) - set(per_task))
    assert not missing, f"tasks never delivered: {missing}"
    twice = sorted(task_id for task_id in ids if per_task[task_id] > 1)
    print(
        f"SIGKILLed a worker 3 times over {len(ids)} tasks with {in_flight_at_kill} hook calls"
        f" in flight; delivered twice or more: {len(twice)} tasks {twice[:20]}"
    )
    assert sum(in_flight_at_kill) > 0, "no kill hit a hook call in flight"


async def test_a_backlog_past_the_notify_limit_keeps_the_list_bounded_and_is_all_delivered(
    processes: Processes, hook: HookServer, pg_url: str, redis_channel: str, tmp_path: Path
) -> None:
    env = procfile_env(tmp_path, pg_url, redis_channel, NTORQUE_NOTIFY_BACKLOG_LIMIT="25")
    api = Api(await start_web(processes, env), await create_app(processes, env))
    redis = aioredis.Redis.from_url(support.REDIS_URL, socket_timeout=5)
    try:
        # Given the web and the clock running, and no worker: a backlog of 120 tasks
        await start_role(processes, "clock", env, "clock")
        ids = await api.enqueue_many(hook.url + "/ok", 120)
        # Then the notification list holds no more than the limit, round after round
        assert await redis.llen(redis_channel) == 25
        await asyncio.sleep(1.5)  # a few of the clock's requeue rounds (0.2 s apart)
        assert await redis.llen(redis_channel) == 25
        # And once a worker starts, every task is delivered, the unrung ones found by polling
        await start_role(processes, "worker", env, "worker")
        await api.wait_status(ids, "COMPLETED", timeout_s=60)
    finally:
        await api.close()
        await redis.aclose()
    assert sorted(hook.per_task()) == sorted(ids)
