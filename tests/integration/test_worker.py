"""The worker on every backend, including polling (no doorbell at all)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from ntorque.hooks import AiohttpHookClient
from ntorque.models import Outcome
from ntorque.notify import Notifier, RedisNotifier
from ntorque.settings import Settings
from ntorque.store import Store, StoreUnavailable
from ntorque.worker import Worker
from tests.conftest import ALL_BACKENDS, backend_param
from tests.support import (
    FreezingProxy,
    HookServer,
    Reply,
    make_settings,
    new_task,
    run_burst,
    run_until_settled,
    silent_server,
    wait_until,
    worker_running,
)

EVERY = pytest.mark.parametrize("backend", [backend_param(n) for n in ALL_BACKENDS], indirect=True)


@EVERY
async def test_running_worker_delivers_rung_and_unrung_tasks(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    url = hook_server.script("/h", 200)
    async with worker_running(settings, store, notifier):
        rung = await store.add_tasks([new_task(url, body=b"rung") for _ in range(5)])
        await notifier.notify([t.id for t in rung])
        # Nobody rings for these: the worker's poll must find them.
        silent = await store.add_tasks([new_task(url, body=b"silent") for _ in range(5)])
        await wait_until(lambda: hook_server.count("/h") >= 10, timeout_s=15, message="delivery")
    for task in [*rung, *silent]:
        stored = await store.get_task(task.id)
        assert stored is not None and stored.status == "COMPLETED"
    assert sorted(c.body for c in hook_server.calls("/h")) == [b"rung"] * 5 + [b"silent"] * 5


@pytest.mark.parametrize(
    "backend", [backend_param("sqlite-local"), backend_param("postgres-redis")], indirect=True
)
@pytest.mark.ntorque_env(NTORQUE_WORKER_CONCURRENCY="2", NTORQUE_POLL_INTERVAL="0.5")
async def test_a_task_nobody_rang_gets_its_turn_while_notifications_keep_coming(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    slow = hook_server.script("/slow", Reply(delay_s=0.1))
    unrung_url = hook_server.script("/unrung", 200)

    async def ring_more(n: int) -> None:
        added = await store.add_tasks([new_task(slow) for _ in range(n)])
        await notifier.notify([t.id for t in added])

    async with worker_running(settings, store, notifier):
        # Given a worker waiting on its doorbell (its first poll found nothing), then a
        # backlog of rung tasks (about a second's work, 2 at a time)
        await asyncio.sleep(0.2)
        await ring_more(20)
        # When a task is stored that nobody rings for (a retry come due, say), and rung
        # tasks keep coming faster than the worker takes them, so the list never runs dry
        await store.add_tasks([new_task(unrung_url)])
        started = time.monotonic()
        waited = None
        for _ in range(12):  # 6 s at most
            await ring_more(20)
            await asyncio.sleep(0.5)
            if hook_server.count("/unrung"):
                waited = time.monotonic() - started
                break
        # Then it is called once the tasks due before it are: a database poll at least
        # every poll interval finds it, though the notifications never stopped
        assert waited is not None, "not called while notifications kept coming"
        assert waited < 4, f"called {waited:.1f}s after it was stored"
        assert await notifier.pending() > 0


@EVERY
@pytest.mark.ntorque_env(NTORQUE_WORKER_CONCURRENCY="3")
async def test_concurrency_bounds_calls_in_flight(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    url = hook_server.script("/slow", Reply(delay_s=0.2))
    added = await store.add_tasks([new_task(url) for _ in range(9)])
    await run_until_settled(settings, store, notifier, [t.id for t in added])
    assert hook_server.count("/slow") == 9
    assert hook_server.max_concurrent["/slow"] <= 3


@pytest.mark.ntorque_env(NTORQUE_SHUTDOWN_GRACE="10")
async def test_stop_lets_in_flight_calls_finish(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    url = hook_server.script("/slow", Reply(delay_s=0.5))
    [task] = await store.add_tasks([new_task(url)])
    hooks = AiohttpHookClient(settings)
    worker = Worker(settings, store, notifier, hooks)
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: hook_server.count("/slow") == 1, timeout_s=10, message="call")
        worker.stop()
        async with asyncio.timeout(15):
            await running
    finally:
        await hooks.close()
    stored = await store.get_task(task.id)
    assert stored is not None and stored.status == "COMPLETED", "recorded before exiting"


@pytest.mark.ntorque_env(NTORQUE_SHUTDOWN_GRACE="0.2")
async def test_stop_after_the_grace_period_leaves_the_task_for_a_retry(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    url = hook_server.script("/slow", Reply(delay_s=3), 200)
    [task] = await store.add_tasks([new_task(url, timeout=2)])
    hooks = AiohttpHookClient(settings)
    worker = Worker(settings, store, notifier, hooks)
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: hook_server.count("/slow") == 1, timeout_s=10, message="call")
        worker.stop()
        async with asyncio.timeout(10):
            await running
    finally:
        await hooks.close()
    stored = await store.get_task(task.id)
    assert stored is not None and (stored.status, stored.retry_count) == ("PENDING", 1)
    assert stored.due > stored.modified, "still leased: retried once the lease runs out"


@pytest.mark.ntorque_env(NTORQUE_SHUTDOWN_GRACE="0.5", NTORQUE_WORKER_CONCURRENCY="2")
async def test_stop_with_every_slot_busy_still_ends_within_the_grace_period(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    # Given a worker whose every slot holds a call that will take far longer than the grace
    url = hook_server.script("/slow", Reply(delay_s=20))
    tasks = await store.add_tasks([new_task(url, timeout=30) for _ in range(2)])
    await notifier.notify([t.id for t in tasks])
    hooks = AiohttpHookClient(settings)
    worker = Worker(settings, store, notifier, hooks)
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: hook_server.count("/slow") == 2, timeout_s=10, message="calls")
        # When it is told to stop (SIGTERM)
        stopped_at = time.monotonic()
        worker.stop()
        async with asyncio.timeout(10):
            await running
        # Then it cuts the calls short after the grace period, not after a call ends
        assert time.monotonic() - stopped_at < 0.5 + 2
    finally:
        running.cancel()
        await hooks.close()
    for task in tasks:
        stored = await store.get_task(task.id)
        assert stored is not None and (stored.status, stored.retry_count) == ("PENDING", 1)


def _sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.ntorque_env(NTORQUE_MAX_RETRIES="1")
async def test_metrics_count_tasks_by_their_final_outcome(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    names = {
        "completed": ("ntorque_tasks_completed_total", {}),
        "failed": ("ntorque_tasks_failed_total", {}),
        "retries": ("ntorque_retries_total", {}),
        "attempts retry": ("ntorque_attempts_total", {"outcome": "retry"}),
        "attempts failed": ("ntorque_attempts_total", {"outcome": "failed"}),
        "hook 5xx failed": (
            "ntorque_hook_duration_seconds_count",
            {"outcome": "failed", "status_class": "5xx"},
        ),
    }
    before = {k: _sample(n, **labels) for k, (n, labels) in names.items()}
    # Given one task that succeeds, and one whose hook answers 500 on both allowed attempts
    ok = hook_server.script("/ok", 200)
    broken = hook_server.script("/broken", 500)
    tasks = await store.add_tasks([new_task(ok), new_task(broken)])
    # When they settle
    await notifier.notify([t.id for t in tasks])
    await run_until_settled(settings, store, notifier, [t.id for t in tasks])
    # Then the metrics say one completed, one failed after a single retry: the last
    # attempt's 500 is not counted as a retry, since nothing will retry it.
    delta = {k: _sample(n, **labels) - before[k] for k, (n, labels) in names.items()}
    assert delta == {
        "completed": 1,
        "failed": 1,
        "retries": 1,
        "attempts retry": 1,
        "attempts failed": 1,
        "hook 5xx failed": 1,
    }


# What a finished attempt may add to: the first two count attempts, the rest tasks.
OUTCOME_METRICS = {
    "attempts": ("ntorque_attempts_total", {}),  # the verdict's label is added per test
    "hook calls": ("ntorque_hook_duration_seconds_count", {}),  # and the status class
    "completed": ("ntorque_tasks_completed_total", {}),
    "failed": ("ntorque_tasks_failed_total", {}),
    "retries": ("ntorque_retries_total", {}),
    "completed duration": ("ntorque_task_duration_seconds_count", {"status": "completed"}),
    "failed duration": ("ntorque_task_duration_seconds_count", {"status": "failed"}),
    "stale": ("ntorque_stale_outcomes_total", {}),
}


def _outcome_metrics(verdict: str, status_class: str) -> dict[str, float]:
    labels = {
        "attempts": {"outcome": verdict},
        "hook calls": {"outcome": verdict, "status_class": status_class},
    }
    return {
        key: _sample(name, **labels.get(key, fixed))
        for key, (name, fixed) in OUTCOME_METRICS.items()
    }


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


async def _newer_attempt_completes(store: Store, task_id: int, now: float) -> None:
    """What another worker does once a lease has run out: take the next attempt, finish it."""
    [newer] = await store.acquire([task_id], now=now)
    # The class's own record: a test may have put a faulty one on this instance.
    await Store.record(store, [Outcome(task_id, newer.retry_count, "COMPLETED", now, 200, None)])


@pytest.mark.parametrize(
    ("answer", "verdict"), [(200, "completed"), (404, "failed"), (503, "retry")]
)
async def test_a_stale_outcome_counts_its_attempt_but_not_the_task(
    settings: Settings,
    store: Store,
    notifier: Notifier,
    hook_server: HookServer,
    answer: int,
    verdict: str,
) -> None:
    # Given a hook call still running when a newer attempt has taken the task (the first
    # attempt's lease ran out) and completed it
    url = hook_server.script("/slow", Reply(status=answer, delay_s=0.5))
    [task] = await store.add_tasks([new_task(url)])
    before = _outcome_metrics(verdict, f"{answer // 100}xx")
    running = asyncio.create_task(run_burst(settings, store, notifier))
    try:
        await wait_until(lambda: hook_server.count("/slow") == 1, timeout_s=10, message="call")
        await _newer_attempt_completes(store, task.id, now=time.time() + 3600)
    finally:
        # When the first attempt's late answer comes in (the burst ends once it is handled)
        async with asyncio.timeout(15):
            await running
    # Then the attempt and its hook call count, but the task was completed by the newer
    # attempt: the stale outcome adds nothing to the task counters or durations
    after = _outcome_metrics(verdict, f"{answer // 100}xx")
    assert _delta(after, before) == {"attempts": 1, "hook calls": 1, "stale": 1}
    stored = await store.get_task(task.id)
    assert stored is not None
    assert (stored.status, stored.retry_count, stored.last_status) == ("COMPLETED", 2, 200)


async def test_an_outcome_whose_answer_was_lost_is_counted_once(
    settings: Settings,
    store: Store,
    notifier: Notifier,
    hook_server: HookServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a database that writes the first outcome, then loses the answer (the connection
    # breaks between commit and reply), so the worker tries again within the lease
    url = hook_server.script("/h", 200)
    [task] = await store.add_tasks([new_task(url, timeout=10)])
    record = store.record
    tries = 0

    async def answer_lost_once(outcomes: list[Outcome]) -> Any:
        nonlocal tries
        tries += 1
        written = await record(outcomes)
        if tries == 1:
            raise StoreUnavailable("ConnectionResetError: connection lost after COMMIT")
        return written

    monkeypatch.setattr(store, "record", answer_lost_once)
    before = _outcome_metrics("completed", "2xx")
    # When the worker handles the task
    await run_burst(settings, store, notifier)
    # Then the second try found the outcome already written, by its own first try: the
    # task is counted once, and nothing was stale
    assert tries == 2
    after = _outcome_metrics("completed", "2xx")
    assert _delta(after, before) == {
        "attempts": 1,
        "hook calls": 1,
        "completed": 1,
        "completed duration": 1,
    }
    stored = await store.get_task(task.id)
    assert stored is not None and (stored.status, stored.retry_count) == ("COMPLETED", 1)


async def test_an_outcome_refused_until_its_lease_ran_out_is_stale(
    settings: Settings,
    store: Store,
    notifier: Notifier,
    hook_server: HookServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a database that refuses the first outcome, and lets the next try in only once
    # the attempt's lease has run out and a newer attempt has completed the task
    url = hook_server.script("/h", 200)
    [task] = await store.add_tasks([new_task(url, timeout=1)])
    record = store.record
    tries = 0
    newer_done = asyncio.Event()

    async def down_until_the_lease_ran_out(outcomes: list[Outcome]) -> Any:
        nonlocal tries
        tries += 1
        if tries == 1:
            raise StoreUnavailable("ConnectionRefusedError: the database is down")
        await newer_done.wait()
        return await record(outcomes)

    monkeypatch.setattr(store, "record", down_until_the_lease_ran_out)
    before = _outcome_metrics("completed", "2xx")
    running = asyncio.create_task(run_burst(settings, store, notifier))
    try:
        await wait_until(lambda: tries == 1, timeout_s=10, message="the refused try")
        leased = await store.get_task(task.id)
        assert leased is not None and leased.retry_count == 1
        await asyncio.sleep(max(leased.due - time.time(), 0) + 0.05)
        await _newer_attempt_completes(store, task.id, now=time.time())
        newer_done.set()
    finally:
        newer_done.set()
        # When the worker's outcome is answered, after the lease
        async with asyncio.timeout(15):
            await running
    # Then it is stale: the newer attempt counts the task, so the worker does not
    assert tries == 2
    after = _outcome_metrics("completed", "2xx")
    assert _delta(after, before) == {"attempts": 1, "hook calls": 1, "stale": 1}
    stored = await store.get_task(task.id)
    assert stored is not None and (stored.status, stored.retry_count) == ("COMPLETED", 2)


@pytest.mark.parametrize("backend", [backend_param("postgres-redis")], indirect=True)
async def test_a_silent_redis_is_left_for_database_polls_after_one_timeout(
    settings: Settings, store: Store, hook_server: HookServer
) -> None:
    url = hook_server.script("/h", 200)
    # Given a worker whose Redis accepts connections but never answers (a black hole)
    async with silent_server() as port:
        notifier = RedisNotifier(make_settings(REDIS_URL=f"redis://127.0.0.1:{port}/0"))
        failures = "ntorque_notify_failures_total"
        before = REGISTRY.get_sample_value(failures, {"role": "worker"}) or 0.0
        try:
            async with worker_running(settings, store, notifier):
                await asyncio.sleep(0.3)  # its first poll done, it waits on Redis
                # When tasks are stored and nobody rings for them
                added = await store.add_tasks([new_task(url) for _ in range(5)])
                started = time.monotonic()
                await wait_until(lambda: hook_server.count("/h") >= 5, 10, message="delivery")
                waited = time.monotonic() - started
                # Then the worker gives up on Redis after one wait's timeout (the poll
                # interval and a second), not several seconds more, and polls the database
                assert waited < 3.5, f"delivered {waited:.1f}s after they were stored"
                # And keeps off Redis for a while rather than wait on it again (longer
                # than another wait's timeout after the delivering poll)
                await asyncio.sleep(1.5)
                after = REGISTRY.get_sample_value(failures, {"role": "worker"}) or 0.0
                assert after - before == 1
        finally:
            await notifier.close()
    for task in added:
        stored = await store.get_task(task.id)
        assert stored is not None and stored.status == "COMPLETED"


@pytest.mark.parametrize("backend", [backend_param("postgres-redis")], indirect=True)
@pytest.mark.ntorque_env(NTORQUE_DB_TIMEOUT="1")
async def test_an_acquire_stuck_on_a_dead_connection_is_given_up_at_the_database_timeout(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    url = hook_server.script("/h", 200)
    # Given a worker reaching PostgreSQL through a proxy, delivering
    proxy, proxied_url = await FreezingProxy.in_front_of(settings.database_url)
    proxied = dataclasses.replace(settings, database_url=proxied_url)
    worker_store = Store.from_settings(proxied)
    try:
        async with worker_running(proxied, worker_store, notifier):
            first = await store.add_tasks([new_task(url)])
            await notifier.notify([first[0].id])
            await wait_until(lambda: hook_server.count("/h") >= 1, 10, message="delivery")
            # When the database goes silent, its open connections dead for good (a
            # failover), while the worker acquires a task rung for
            proxy.frozen = True
            second = await store.add_tasks([new_task(url)])
            await notifier.notify([second[0].id])
            await asyncio.sleep(0.3)
            # And answers again on new connections
            proxy.frozen = False
            started = time.monotonic()
            # Then the acquire stuck on the dead connection is given up at the database
            # timeout and a later poll delivers the task: not after the driver's own 30 s
            await wait_until(lambda: hook_server.count("/h") >= 2, 15, message="delivery")
            waited = time.monotonic() - started
            assert waited < 8, f"delivered {waited:.1f}s after the database was back"
    finally:
        await worker_store.close()
        await proxy.close()
    stored = await store.get_task(second[0].id)
    assert stored is not None and stored.status == "COMPLETED"
