"""Every outcome rule against a real hook server, on both backends.

Backoff is checked on the stored ``due`` values (what the worker wrote), never on speed.
"""

from __future__ import annotations

import itertools
import time

import pytest

from ntorque.backoff import backoff_s
from ntorque.hooks import AiohttpHookClient, decide
from ntorque.notify import Notifier
from ntorque.settings import Settings
from ntorque.store import Store
from tests.support import HookServer, Reply, new_task, refused_url, run_until_settled

pytestmark = pytest.mark.ntorque_env(NTORQUE_MAX_RETRIES="2")


async def deliver(
    settings: Settings, store: Store, notifier: Notifier, url: str, timeout_s: int = 5
) -> int:
    [task] = await store.add_tasks([new_task(url, body=b"x", timeout=timeout_s)])
    await notifier.notify([task.id])
    await run_until_settled(settings, store, notifier, [task.id])
    return task.id


@pytest.mark.parametrize("code", [200, 201])
async def test_success_codes_complete(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer, code: int
) -> None:
    task_id = await deliver(settings, store, notifier, hook_server.script("/h", code))
    task = await store.get_task(task_id)
    assert task is not None
    assert (task.status, task.retry_count, task.last_status, task.last_error) == (
        "COMPLETED",
        1,
        code,
        None,
    )
    assert hook_server.count("/h") == 1


@pytest.mark.parametrize("code", [202, 204, 400, 404, 499])
async def test_permanent_codes_fail_after_one_attempt(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer, code: int
) -> None:
    task_id = await deliver(settings, store, notifier, hook_server.script("/h", code))
    task = await store.get_task(task_id)
    assert task is not None
    assert (task.status, task.retry_count, task.last_status) == ("FAILED", 1, code)
    assert hook_server.count("/h") == 1


@pytest.mark.parametrize("code", [408, 423, 429, 449, 500, 502, 503])
async def test_transient_codes_retry_then_fail(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer, code: int
) -> None:
    task_id = await deliver(settings, store, notifier, hook_server.script("/h", code))
    task = await store.get_task(task_id)
    assert task is not None
    # NTORQUE_MAX_RETRIES=2: three attempts in all, numbered 0, 1, 2 in the header.
    assert (task.status, task.retry_count, task.last_status) == ("FAILED", 3, code)
    calls = hook_server.calls("/h")
    assert [c.headers["NTORQUE-TASK-RETRY-COUNT"] for c in calls] == ["0", "1", "2"]
    # A retry is never started before the due date the failed attempt stored.
    for k, (before, after) in enumerate(itertools.pairwise(calls), start=1):
        assert before.finished_at is not None
        wait = backoff_s(
            k,
            strategy=settings.backoff,
            min_delay_s=settings.min_due_delay_s,
            max_delay_s=settings.max_due_delay_s,
        )
        assert after.received_at >= before.finished_at + wait - 0.005


@pytest.mark.parametrize(
    ("strategy", "delays"),
    [("linear", [0.1, 0.2, 0.3, 0.4]), ("exponential", [0.1, 0.2, 0.4, 0.5])],
)
@pytest.mark.ntorque_env(
    NTORQUE_MAX_RETRIES="4", NTORQUE_MIN_DUE_DELAY="0.1", NTORQUE_MAX_DUE_DELAY="0.5"
)
async def test_worker_retries_wait_for_the_stored_due(
    backend: object, hook_server: HookServer, strategy: str, delays: list[float]
) -> None:
    """Through the real worker: the next call never comes before the due date the failed
    attempt stored, which is the formula's delay (capped) after it."""
    from tests.conftest import Backend, notifier_for

    assert isinstance(backend, Backend)
    settings = backend.settings.replace(backoff=strategy)
    store, notifier = Store.from_settings(settings), notifier_for(backend)
    try:
        url = hook_server.script("/h", 503, 503, 503, 503, 200)
        [task] = await store.add_tasks([new_task(url)])
        await run_until_settled(settings, store, notifier, [task.id])
        done = await store.get_task(task.id)
        assert done is not None and (done.status, done.retry_count) == ("COMPLETED", 5)
        calls = hook_server.calls("/h")
        for (before, after), delay in zip(itertools.pairwise(calls), delays, strict=True):
            assert before.finished_at is not None
            assert after.received_at >= before.finished_at + delay - 0.005
    finally:
        await notifier.close()
        await store.close()


async def test_transient_then_success_completes(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    url = hook_server.script("/h", 503, 429, 200)
    task_id = await deliver(settings, store, notifier, url)
    task = await store.get_task(task_id)
    assert task is not None and (task.status, task.retry_count) == ("COMPLETED", 3)


async def test_refused_connection_is_retried_then_fails(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    task_id = await deliver(settings, store, notifier, refused_url())
    task = await store.get_task(task_id)
    assert task is not None
    assert (task.status, task.retry_count, task.last_status) == ("FAILED", 3, None)
    assert task.last_error


@pytest.mark.ntorque_env(NTORQUE_MAX_RETRIES="1")
async def test_timeout_is_retried_then_fails(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    url = hook_server.script("/slow", Reply(delay_s=3))
    task_id = await deliver(settings, store, notifier, url, timeout_s=1)
    task = await store.get_task(task_id)
    assert task is not None
    assert (task.status, task.retry_count, task.last_status) == ("FAILED", 2, None)
    assert task.last_error is not None and "timed out" in task.last_error
    assert hook_server.count("/slow") == 2


@pytest.mark.ntorque_env(NTORQUE_TRANSIENT_REQUEST_ERRORS="418")
async def test_custom_transient_codes(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    teapot = await deliver(settings, store, notifier, hook_server.script("/teapot", 418, 200))
    limited = await deliver(settings, store, notifier, hook_server.script("/limited", 429))
    t1, t2 = await store.get_task(teapot), await store.get_task(limited)
    assert t1 is not None and (t1.status, t1.retry_count) == ("COMPLETED", 2)
    assert t2 is not None and (t2.status, t2.retry_count) == ("FAILED", 1)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_followed(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer, status: int
) -> None:
    hook_server.script("/target", 200)
    url = hook_server.script("/moved", Reply(status=status, redirect_to="/target"))
    task_id = await deliver(settings, store, notifier, url)
    task = await store.get_task(task_id)
    assert task is not None and task.status == "COMPLETED"
    assert hook_server.count("/moved") == 1
    [target] = hook_server.calls("/target")
    if status in (307, 308):
        # These redirects keep the method and the body.
        assert (target.method, target.body) == ("POST", b"x")


async def test_redirect_to_a_failing_target_uses_the_targets_status(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    hook_server.script("/gone", 404)
    url = hook_server.script("/moved", Reply(status=307, redirect_to="/gone"))
    task_id = await deliver(settings, store, notifier, url)
    task = await store.get_task(task_id)
    assert task is not None and (task.status, task.last_status) == ("FAILED", 404)


@pytest.mark.ntorque_env(NTORQUE_MAX_REDIRECTS="3")
async def test_redirect_loop_fails_without_retrying(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    url = hook_server.script("/loop", Reply(status=302, redirect_to="/loop"))
    task_id = await deliver(settings, store, notifier, url)
    task = await store.get_task(task_id)
    assert task is not None and (task.status, task.retry_count) == ("FAILED", 1)
    assert hook_server.count("/loop") <= 4


@pytest.mark.parametrize("strategy", ["linear", "exponential"])
@pytest.mark.ntorque_env(
    NTORQUE_MAX_RETRIES="5", NTORQUE_MIN_DUE_DELAY="0.5", NTORQUE_MAX_DUE_DELAY="3"
)
async def test_stored_due_follows_the_backoff_formula(
    backend: object, hook_server: HookServer, strategy: str
) -> None:
    """Attempt by attempt (acquire, call, decide, record, as the worker does), with the
    clock passed in: each stored lease and retry due is exactly the formula's value."""
    from tests.conftest import Backend

    assert isinstance(backend, Backend)
    settings = backend.settings.replace(backoff=strategy)
    store = Store.from_settings(settings)
    hooks = AiohttpHookClient(settings)
    try:
        url = hook_server.script("/h", 503)
        [task] = await store.add_tasks([new_task(url, timeout=4)])
        now = time.time()
        expected_retry_dues = []
        stored_retry_dues = []
        for k in range(1, settings.max_retries + 2):
            [taken] = await store.acquire([task.id], now=now)
            assert taken.retry_count == k
            lease = backoff_s(
                k,
                strategy=strategy,
                min_delay_s=settings.min_due_delay_s,
                max_delay_s=settings.max_due_delay_s,
            )
            assert taken.due == pytest.approx(now + 4 + lease, abs=1e-6)
            result = await hooks.call(taken)
            assert result.status_code == 503
            _, outcome = decide(taken, result, settings, now)
            assert await store.record([outcome]) == 1
            stored = await store.get_task(task.id)
            assert stored is not None
            if k <= settings.max_retries:
                assert stored.status == "PENDING"
                stored_retry_dues.append(stored.due - now)
                expected_retry_dues.append(lease)
                now = stored.due
            else:
                assert stored.status == "FAILED"
        assert stored_retry_dues == pytest.approx(expected_retry_dues, abs=1e-6)
        if strategy == "linear":
            assert expected_retry_dues == [0.5, 1.0, 1.5, 2.0, 2.5]
        else:
            assert expected_retry_dues == [0.5, 1.0, 2.0, 3.0, 3.0]
        assert hook_server.count("/h") == settings.max_retries + 1
    finally:
        await hooks.close()
        await store.close()
