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


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirects_keep_the_method_and_the_body(
    settings: Settings,
    store: Store,
    notifier: Notifier,
    hook_server: HookServer,
    status: int,
    method: str,
) -> None:
    # Given a hook that moved (e.g. http -> https, or a new path)
    hook_server.script("/target", 200)
    url = hook_server.script("/moved", Reply(status=status, redirect_to="/target"))
    # When a task is delivered to its old URL
    [task] = await store.add_tasks(
        [new_task(url, body=b"\x00payload", method=method, content_type="text/plain")]
    )
    await notifier.notify([task.id])
    await run_until_settled(settings, store, notifier, [task.id])
    # Then the new URL receives the same request, payload included, never a bodiless GET
    done = await store.get_task(task.id)
    assert done is not None and done.status == "COMPLETED"
    assert hook_server.count("/moved") == 1
    [target] = hook_server.calls("/target")
    assert (target.method, target.body) == (method, b"\x00payload")
    assert target.headers["Content-Type"] == "text/plain"
    assert target.headers["NTORQUE-TASK-ID"] == str(task.id)


async def test_see_other_is_read_with_a_get(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    # 303: the hook handled the POST and points at its answer, which is fetched with a GET.
    hook_server.script("/result", 200)
    url = hook_server.script("/form", Reply(status=303, redirect_to="/result"))
    task_id = await deliver(settings, store, notifier, url)
    task = await store.get_task(task_id)
    assert task is not None and task.status == "COMPLETED"
    [form] = hook_server.calls("/form")
    assert (form.method, form.body) == ("POST", b"x")
    [result] = hook_server.calls("/result")
    assert (result.method, result.body) == ("GET", b"")


@pytest.mark.ntorque_env(NTORQUE_MAX_REDIRECTS="2")
async def test_exactly_max_redirects_are_followed(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    # NTORQUE_MAX_REDIRECTS=2: a chain of two redirects is followed to its end ...
    hook_server.script("/two-b", Reply(status=302, redirect_to="/two-end"))
    two = hook_server.script("/two-a", Reply(status=302, redirect_to="/two-b"))
    # ... a chain of three is not.
    hook_server.script("/three-c", Reply(status=302, redirect_to="/three-end"))
    hook_server.script("/three-b", Reply(status=302, redirect_to="/three-c"))
    three = hook_server.script("/three-a", Reply(status=302, redirect_to="/three-b"))
    followed = await store.get_task(await deliver(settings, store, notifier, two))
    refused = await store.get_task(await deliver(settings, store, notifier, three))
    assert followed is not None and followed.status == "COMPLETED"
    assert hook_server.count("/two-end") == 1
    assert refused is not None
    assert (refused.status, refused.retry_count, refused.last_error) == (
        "FAILED",
        1,
        "too many redirects",
    )
    assert hook_server.count("/three-c") == 1 and hook_server.count("/three-end") == 0


@pytest.mark.ntorque_env(NTORQUE_MAX_REDIRECTS="1")
async def test_one_redirect_allowed_follows_one(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    hook_server.script("/end", 200)
    url = hook_server.script("/start", Reply(status=301, redirect_to="/end"))
    task = await store.get_task(await deliver(settings, store, notifier, url))
    assert task is not None and task.status == "COMPLETED"
    assert [r.method for r in hook_server.calls("/end")] == ["POST"]


@pytest.mark.ntorque_env(NTORQUE_MAX_REDIRECTS="0")
async def test_with_no_redirects_allowed_the_redirect_is_the_answer(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    url = hook_server.script("/start", Reply(status=301, redirect_to="/end"))
    task = await store.get_task(await deliver(settings, store, notifier, url))
    assert task is not None and (task.status, task.last_status) == ("FAILED", 301)
    assert hook_server.count("/end") == 0


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
            assert await store.record([outcome]) == [True]
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


async def test_credentials_do_not_follow_a_redirect_to_another_host(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    # The same server under another host name is another origin.
    other = hook_server.url("/elsewhere").replace("127.0.0.1", "localhost")
    hook_server.script("/here", 200)
    hook_server.script("/elsewhere", 200)
    near = hook_server.script("/near", Reply(status=307, redirect_to="/here"))
    far = hook_server.script("/far", Reply(status=307, redirect_to=other))
    secret = [("Authorization", "Bearer s3cret"), ("X-Other", "kept")]
    tasks = await store.add_tasks(
        [new_task(near, body=b"x", headers=secret), new_task(far, body=b"x", headers=secret)]
    )
    await notifier.notify([t.id for t in tasks])
    await run_until_settled(settings, store, notifier, [t.id for t in tasks])
    [here] = hook_server.calls("/here")
    [elsewhere] = hook_server.calls("/elsewhere")
    assert here.headers.get("Authorization") == "Bearer s3cret"
    assert "Authorization" not in elsewhere.headers
    assert (elsewhere.headers.get("X-Other"), elsewhere.body) == ("kept", b"x")
