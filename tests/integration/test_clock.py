"""The clock: cleanup deletes only old finished tasks; requeue rings in due order, bounded.

Same tests on SQLite + in-process and PostgreSQL + Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from ntorque import notify
from ntorque.clock import Clock
from ntorque.notify import Notifier, PollingNotifier, RedisNotifier
from ntorque.schema import tasks
from ntorque.settings import Settings
from ntorque.store import Store
from tests.conftest import Backend, backend_param, notifier_for
from tests.support import make_settings, new_task, silent_server, wait_until

URL = "http://127.0.0.1:9/hook"
DAY = 86400.0


async def set_rows(store: Store, ids: list[int], **values: object) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(tasks.update().where(tasks.c.id.in_(ids)).values(**values))


async def remaining(store: Store) -> set[int]:
    async with store.engine.connect() as conn:
        return {r.id for r in await conn.execute(sa.select(tasks.c.id))}


@pytest.mark.ntorque_env(NTORQUE_CLEANUP_AFTER_DAYS="7", NTORQUE_CLEANUP_BATCH="3")
async def test_cleanup_deletes_only_old_finished_tasks(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    now = time.time()
    added = await store.add_tasks([new_task(URL) for _ in range(17)])
    ids = [t.id for t in added]
    old_completed, old_failed = ids[0:4], ids[4:8]
    old_pending, new_completed, new_failed, new_pending = (
        ids[8:11],
        ids[11:13],
        ids[13:15],
        ids[15:17],
    )
    await set_rows(store, old_completed, status="COMPLETED", modified=now - 8 * DAY)
    await set_rows(store, old_failed, status="FAILED", modified=now - 30 * DAY)
    # Pending for weeks (e.g. a long backoff, or a stuck task): never deleted.
    await set_rows(store, old_pending, modified=now - 40 * DAY, due=now + DAY)
    await set_rows(store, new_completed, status="COMPLETED", modified=now - 6 * DAY)
    await set_rows(store, new_failed, status="FAILED", modified=now - 60)
    deleted = await Clock(settings, store, notifier).cleanup()
    assert deleted == 8, "batches of 3 repeat until all old finished tasks are gone"
    assert await remaining(store) == set(old_pending + new_completed + new_failed + new_pending)
    assert await Clock(settings, store, notifier).cleanup() == 0


@pytest.mark.ntorque_env(NTORQUE_CLEANUP_AFTER_DAYS="0")
async def test_a_cleaned_up_tasks_id_is_never_given_to_a_new_task(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    # Given the newest tasks finished and cleaned up (a client may still hold their ids)
    old = [t.id for t in await store.add_tasks([new_task(URL) for _ in range(3)])]
    await set_rows(store, old, status="COMPLETED", modified=time.time() - 1)
    assert await Clock(settings, store, notifier).cleanup() == 3
    # When a new task is stored, then it gets an id of its own: /tasks/<old id> stays 404.
    [new] = await store.add_tasks([new_task(URL)])
    assert new.id > max(old)
    assert await store.get_task(max(old)) is None


@pytest.mark.ntorque_env(NTORQUE_NOTIFY_BACKLOG_LIMIT="2000", NTORQUE_REQUEUE_BATCH="500")
async def test_requeue_of_a_big_backlog_stays_bounded_and_in_due_order(
    backend: Backend, settings: Settings, store: Store, notifier: Notifier
) -> None:
    for start in range(0, 10_000, 2500):
        await store.add_tasks([new_task(URL) for _ in range(start, start + 2500)])
    now = time.time()
    async with store.engine.begin() as conn:
        # Due order is the reverse of id order, so ringing by id would be caught.
        await conn.execute(tasks.update().values(due=now - 100 - tasks.c.id * 0.001))
        newest = (await conn.execute(sa.select(sa.func.max(tasks.c.id)))).scalar_one()
    clock = Clock(settings, store, notifier)
    assert await clock.requeue() == 2000
    assert await notifier.pending() == 2000
    assert await clock.requeue() == 0, "a full channel takes no more"
    assert await notifier.pending() == 2000

    # Workers take 700; the next requeue refills only up to the bound.
    taken = await notifier.wait(700, 1.0)
    assert taken == list(range(newest, newest - 700, -1)), "rung in due order"
    assert await notifier.pending() == 1300
    assert await clock.requeue() == 700
    assert await notifier.pending() == 2000
    if backend.notify == "redis":
        # Redis keeps duplicates: the refill rang the oldest due tasks again.
        rest = await notifier.wait(2000, 1.0)
        assert rest[:1300] == list(range(newest - 700, newest - 2000, -1))
        assert rest[1300:] == list(range(newest, newest - 700, -1))


# Several clocks are several processes: they share a channel only through Redis.
@pytest.mark.parametrize("backend", [backend_param("postgres-redis")], indirect=True)
@pytest.mark.ntorque_env(NTORQUE_NOTIFY_BACKLOG_LIMIT="300", NTORQUE_REQUEUE_BATCH="100")
async def test_three_clocks_requeueing_at_once_never_fill_the_channel_past_its_bound(
    backend: Backend, settings: Settings, store: Store, notifier: Notifier
) -> None:
    # Given a backlog of 1,000 due tasks and three clocks (each its own Redis connection).
    await store.add_tasks([new_task(URL) for _ in range(1000)])
    async with three_clocks(backend, settings, store, notifier) as clocks:
        for _ in range(3):
            # When all three requeue at the same moment (each reads the list's length
            # before any of them rings), then workers take half of what waits.
            rung = await asyncio.gather(*(clock.requeue() for clock in clocks))
            # Then together they fill the list up to the bound, never past it.
            assert await notifier.pending() == 300, f"rung {rung}"
            taken = await notifier.wait(150, 1.0)
            assert len(taken) == 150
            await store.acquire(taken)  # a clock may have rung a task another one rang


@contextlib.asynccontextmanager
async def three_clocks(
    backend: Backend, settings: Settings, store: Store, notifier: Notifier
) -> AsyncIterator[list[Clock]]:
    """Three clocks on one store, each with a Redis connection of its own, as processes."""
    others = [notifier_for(backend) for _ in range(2)]
    try:
        yield [Clock(settings, store, n) for n in [notifier, *others]]
    finally:
        for other in others:
            await other.close()


async def test_requeue_never_piles_up_more_notifications_than_tasks_due(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    # Given 5 due tasks, each rung at enqueue (as the web does), and no worker taking them
    added = await store.add_tasks([new_task(URL) for _ in range(5)])
    ids = [t.id for t in added]
    await notifier.notify(ids)
    clock = Clock(settings, store, notifier)
    # When the clock goes round after round
    for _ in range(3):
        await clock.tick()
    # Then the channel still holds one notification per due task, not a pile of duplicates
    assert await notifier.pending() == 5
    # And once those notifications are gone (a Redis flush, say), the next round rings
    # every due task again
    assert sorted(await notifier.wait(50, 1.0)) == ids
    assert await clock.requeue() == 5
    assert sorted(await notifier.wait(50, 1.0)) == ids


@pytest.mark.parametrize("backend", [backend_param("postgres-redis")], indirect=True)
@pytest.mark.ntorque_env(NTORQUE_NOTIFY_BACKLOG_LIMIT="300", NTORQUE_REQUEUE_BATCH="40")
async def test_three_clocks_requeueing_at_once_ring_no_more_than_the_tasks_due(
    backend: Backend, settings: Settings, store: Store, notifier: Notifier
) -> None:
    # Given 100 due tasks nobody rang, and three clocks (each its own Redis connection)
    await store.add_tasks([new_task(URL) for _ in range(100)])
    async with three_clocks(backend, settings, store, notifier) as clocks:
        for _ in range(3):
            # When all three requeue at the same moment, round after round
            rung = await asyncio.gather(*(clock.requeue() for clock in clocks))
            # Then together they ring as many as are due, well below the bound
            assert await notifier.pending() == 100, f"rung {rung}"


async def test_requeue_skips_finished_and_not_yet_due(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    due, later, done = await store.add_tasks([new_task(URL) for _ in range(3)])
    now = time.time()
    await set_rows(store, [due.id], due=now - 5)
    await set_rows(store, [later.id], due=now + 3600)
    await set_rows(store, [done.id], status="COMPLETED", due=now - 10)
    assert await Clock(settings, store, notifier).requeue() == 1
    assert await notifier.wait(10, 1.0) == [due.id]


@pytest.mark.ntorque_env(NTORQUE_MAX_RETRIES="1")
async def test_tick_fails_exhausted_tasks(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    [task] = await store.add_tasks([new_task(URL, timeout=1)])
    now = time.time()
    for _ in range(2):
        [taken] = await store.acquire([task.id], now=now)
        now = taken.due + 0.01
    await set_rows(store, [task.id], due=time.time() - 1, created=time.time() - 3600)
    observed = failed_durations()
    await Clock(settings, store, notifier).tick()
    stored = await store.get_task(task.id)
    assert stored is not None and stored.status == "FAILED"
    assert await notifier.pending() == 0, "an exhausted task is not rung for"
    # Its enqueue-to-outcome time counts, or the failed tasks' latency would read low.
    count, total = failed_durations()
    assert count == observed[0] + 1
    assert 3599 < total - observed[1] < 3700


def failed_durations() -> tuple[float, float]:
    labels = {"status": "failed"}
    count = REGISTRY.get_sample_value("ntorque_task_duration_seconds_count", labels)
    total = REGISTRY.get_sample_value("ntorque_task_duration_seconds_sum", labels)
    return count or 0.0, total or 0.0


@pytest.mark.parametrize("backend", ["sqlite-poll"], indirect=True)
async def test_requeue_with_polling_rings_nothing(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    await store.add_tasks([new_task(URL)])
    assert notifier.rings is False
    assert await Clock(settings, store, notifier).requeue() == 0


@pytest.mark.ntorque_env(NTORQUE_CLEANUP_AFTER_DAYS="0")
async def test_a_running_clock_with_no_retention_deletes_tasks_finished_after_it_started(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    # NTORQUE_CLEANUP_INTERVAL unset: a retention of 0 days is cleaned every requeue round,
    # not only at start and then hourly.
    clock = Clock(settings, store, notifier)
    running = asyncio.create_task(clock.run())
    try:
        await asyncio.sleep(0.3)  # past the clock's first cleanup
        done, pending = await store.add_tasks([new_task(URL) for _ in range(2)])
        await set_rows(store, [done.id], status="COMPLETED", modified=time.time())
        await set_rows(store, [pending.id], due=time.time() + DAY)

        async def only_pending_left() -> bool:
            return await remaining(store) == {pending.id}

        await wait_until(only_pending_left, timeout_s=5, message="the finished task deleted")
    finally:
        clock.stop()
        await running


async def test_a_database_that_never_answers_is_logged_with_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a "database" that accepts connections and never answers (a black hole)
    silent: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = make_settings(
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/none", NTORQUE_DB_TIMEOUT="0.3"
    )
    store = Store.from_settings(settings)
    try:
        # When the clock runs a round against it
        async with asyncio.timeout(20):
            await Clock(settings, store, PollingNotifier()).tick()
    finally:
        await store.close()
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()
    # Then each failed step is logged with what went wrong: a connect timeout carries no
    # message of its own, and "database unavailable: " alone says nothing
    logged = [r.getMessage() for r in caplog.records if r.name == "ntorque.clock"]
    assert logged, "nothing logged"
    assert all(not m.endswith(": ") for m in logged), logged


@pytest.mark.parametrize("backend", [backend_param("postgres-redis")], indirect=True)
async def test_a_silent_redis_is_left_alone_between_requeues_for_its_pause(
    settings: Settings, store: Store
) -> None:
    # Given due tasks, and the clock's Redis accepting connections but never answering
    await store.add_tasks([new_task(URL) for _ in range(3)])
    async with silent_server() as port:
        silent = RedisNotifier(make_settings(REDIS_URL=f"redis://127.0.0.1:{port}/0"))
        clock = Clock(settings, store, silent)
        labels = {"role": "clock"}
        before = REGISTRY.get_sample_value("ntorque_notify_failures_total", labels) or 0.0
        try:
            # When it requeues three times in a row
            started = time.monotonic()
            assert [await clock.requeue() for _ in range(3)] == [0, 0, 0]
            waited = time.monotonic() - started
        finally:
            await silent.close()
    # Then only the first waited (a call's timeout) and failed; the others skipped the channel
    after = REGISTRY.get_sample_value("ntorque_notify_failures_total", labels) or 0.0
    assert after - before == 1
    assert waited < notify.CALL_TIMEOUT_S + 1.0, f"three requeues took {waited:.1f}s"
