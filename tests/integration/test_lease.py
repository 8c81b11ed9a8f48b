"""The lease: a running hook call is never dispatched again; an expired one is retried.

A worker and a clock run for real (tiny requeue interval, so the clock rings for the task
many times while its hook is still answering), on both backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from ntorque.clock import Clock
from ntorque.hooks import AiohttpHookClient
from ntorque.notify import Notifier
from ntorque.settings import Settings
from ntorque.store import Store
from tests.support import HookServer, Reply, new_task, wait_until, worker_running

pytestmark = pytest.mark.ntorque_env(
    NTORQUE_REQUEUE_INTERVAL="0.02", NTORQUE_POLL_INTERVAL="0.02", NTORQUE_MAX_RETRIES="3"
)


@contextlib.asynccontextmanager
async def clock_running(
    settings: Settings, store: Store, notifier: Notifier
) -> AsyncIterator[Clock]:
    clock = Clock(settings, store, notifier)
    job = asyncio.create_task(clock.run(), name="test-clock")
    try:
        yield clock
    finally:
        clock.stop()
        await asyncio.wait_for(job, timeout=10)


async def test_slow_hook_within_its_timeout_is_called_once(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    # 1.2 s is many requeue intervals, but within the task's 3 s timeout.
    url = hook_server.script("/slow", Reply(status=200, delay_s=1.2))
    [task] = await store.add_tasks([new_task(url, timeout=3)])
    async with worker_running(settings, store, notifier), clock_running(settings, store, notifier):
        await notifier.notify([task.id])

        async def finished() -> bool:
            t = await store.get_task(task.id)
            return t is not None and t.status != "PENDING"

        await wait_until(finished, timeout_s=20, message="the slow task to finish")
    done = await store.get_task(task.id)
    assert done is not None and (done.status, done.retry_count) == ("COMPLETED", 1)
    assert hook_server.count("/slow") == 1
    assert hook_server.max_concurrent["/slow"] == 1


async def test_several_workers_share_no_attempt(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    url = hook_server.script("/slow", Reply(status=200, delay_s=0.3))
    tasks = await store.add_tasks([new_task(url, body=str(i).encode()) for i in range(20)])
    ids = [t.id for t in tasks]
    async with (
        worker_running(settings, store, notifier),
        worker_running(settings, store, notifier),
        worker_running(settings, store, notifier),
        clock_running(settings, store, notifier),
    ):
        # Duplicate doorbells for every task.
        for _ in range(3):
            await notifier.notify(ids)

        async def all_done() -> bool:
            stored = [await store.get_task(i) for i in ids]
            return all(t is not None and t.status != "PENDING" for t in stored)

        await wait_until(all_done, timeout_s=30, message="all tasks to finish")
    bodies = sorted(int(c.body) for c in hook_server.calls("/slow"))
    assert bodies == list(range(20)), "each task called exactly once"


async def test_an_abandoned_attempt_is_retried_only_after_its_lease(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    url = hook_server.script("/h", 200)
    [task] = await store.add_tasks([new_task(url, timeout=1)])
    # A worker acquired the task and died before answering: nothing will record it.
    [taken] = await store.acquire([task.id])
    lease_end = taken.due
    assert lease_end >= time.time() + 1, "the lease covers at least the timeout"
    async with worker_running(settings, store, notifier), clock_running(settings, store, notifier):
        await notifier.notify([task.id])  # a ring during the lease must not start it
        await wait_until(lambda: hook_server.count("/h") >= 1, timeout_s=15, message="the retry")
        [call] = hook_server.calls("/h")
        assert call.received_at >= lease_end
        assert call.headers["NTORQUE-TASK-RETRY-COUNT"] == "1"

        async def finished() -> bool:
            t = await store.get_task(task.id)
            return t is not None and t.status == "COMPLETED"

        await wait_until(finished, timeout_s=10, message="completion")
    done = await store.get_task(task.id)
    assert done is not None and done.retry_count == 2


async def test_a_hook_slower_than_its_timeout_is_retried(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    url = hook_server.script("/h", Reply(status=200, delay_s=2.5), 200)
    [task] = await store.add_tasks([new_task(url, timeout=1)])
    async with worker_running(settings, store, notifier), clock_running(settings, store, notifier):
        await notifier.notify([task.id])

        async def finished() -> bool:
            t = await store.get_task(task.id)
            return t is not None and t.status != "PENDING"

        await wait_until(finished, timeout_s=20, message="the retry to complete")
    done = await store.get_task(task.id)
    assert done is not None and (done.status, done.retry_count) == ("COMPLETED", 2)
    first, second = hook_server.calls("/h")[:2]
    assert second.headers["NTORQUE-TASK-RETRY-COUNT"] == "1"
    # The retry came from the client's 1 s timeout (the server saw the request a little
    # after the client started its clock), while the first answer was still pending.
    assert second.received_at >= first.received_at + 0.5, (first, second)
    assert first.finished_at is None or first.finished_at > second.received_at


async def test_a_call_started_late_still_ends_before_its_lease_does(
    settings: Settings, store: Store, hook_server: HookServer
) -> None:
    # Given an attempt whose worker only gets to call the hook 1.5 s after acquiring it
    # (a busy event loop), and a hook that does not answer within the 2 s timeout
    url = hook_server.script("/hang", Reply(status=200, delay_s=10))
    [task] = await store.add_tasks([new_task(url, timeout=2)])
    [taken] = await store.acquire([task.id])
    await asyncio.sleep(1.5)
    # When it calls the hook
    hooks = AiohttpHookClient(settings)
    try:
        result = await hooks.call(taken)
    finally:
        await hooks.close()
    ended = time.time()
    # Then the call is over before the lease lets anyone else retry the task
    assert result.status_code is None and result.error == "timed out after 2s"
    assert ended < taken.due, (ended, taken.due)
    assert ended >= taken.modified + taken.timeout - 0.1
