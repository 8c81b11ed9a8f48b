"""The store's acquire/lease/fencing rules, the same test on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import pytest
import sqlalchemy as sa

from ntorque.models import Outcome
from ntorque.settings import Settings
from ntorque.store import MAX_TASK_ID, Store
from tests.conftest import backend_param
from tests.support import new_task

pytestmark = pytest.mark.ntorque_env(
    NTORQUE_MAX_RETRIES="2", NTORQUE_MIN_DUE_DELAY="1", NTORQUE_MAX_DUE_DELAY="10"
)

URL = "http://127.0.0.1:9/hook"


def outcome(task_id: int, attempt: int, status: str = "COMPLETED", due: float = 0.0) -> Outcome:
    return Outcome(
        task_id=task_id, attempt=attempt, status=status, due=due, status_code=200, error=None
    )


async def test_enqueue_state(store: Store) -> None:
    before = time.time()
    [task] = await store.add_tasks([new_task(URL, body=b"\x00\xff")])
    stored = await store.get_task(task.id)
    assert stored is not None
    assert (stored.status, stored.retry_count, stored.body) == ("PENDING", 0, b"\x00\xff")
    assert before <= stored.due <= time.time()


async def test_add_tasks_keeps_order_and_headers(store: Store) -> None:
    new = [new_task(f"{URL}/{i}", headers=[("X-N", str(i))]) for i in range(50)]
    added = await store.add_tasks(new)
    assert [t.url for t in added] == [t.url for t in new]
    for task in added[::7]:
        stored = await store.get_task(task.id)
        assert stored is not None and stored.url == task.url and stored.headers == task.headers


async def test_acquire_sets_attempt_and_lease(settings: Settings, store: Store) -> None:
    [task] = await store.add_tasks([new_task(URL, timeout=30)])
    now = time.time()
    [taken] = await store.acquire([task.id], now=now)
    assert taken.retry_count == 1
    # The lease covers the whole call (timeout) plus the first backoff.
    assert taken.due == pytest.approx(now + 30 + 1.0, abs=1e-6)
    assert await store.acquire([task.id], now=now + 30.9) == [], "still leased"
    [again] = await store.acquire([task.id], now=now + 31.0)
    assert again.retry_count == 2
    assert again.due == pytest.approx(now + 31 + 30 + 2.0, abs=1e-6)


async def test_acquire_skips_not_due_finished_and_unknown(store: Store) -> None:
    a, b, c = await store.add_tasks([new_task(URL) for _ in range(3)])
    now = time.time()
    [taken_b] = await store.acquire([b.id], now=now)
    await store.record([outcome(b.id, taken_b.retry_count)])
    taken = await store.acquire([a.id, b.id, c.id, 10**12, MAX_TASK_ID, -1, 0], now=now)
    assert sorted(t.id for t in taken) == [a.id, c.id]
    # Not yet due: a future task is not acquired.
    assert await store.acquire([a.id, c.id], now=now + 1) == []


async def test_acquire_due_takes_oldest_first_within_limit(store: Store) -> None:
    tasks = await store.add_tasks([new_task(URL) for _ in range(5)])
    now = time.time() + 0.001
    first = await store.acquire_due(2, now=now)
    assert [t.id for t in first] == [tasks[0].id, tasks[1].id]
    rest = await store.acquire_due(10, now=now)
    assert sorted(t.id for t in rest) == [t.id for t in tasks[2:]]
    assert await store.acquire_due(10, now=now) == []


async def test_concurrent_acquires_take_each_attempt_once(store: Store) -> None:
    tasks = await store.add_tasks([new_task(URL) for _ in range(30)])
    ids = [t.id for t in tasks]
    now = time.time() + 0.001
    rounds = await asyncio.gather(
        *(store.acquire(ids, now=now) for _ in range(6)),
        *(store.acquire_due(30, now=now) for _ in range(4)),
    )
    taken = [t.id for r in rounds for t in r]
    assert sorted(taken) == sorted(ids), "every task acquired exactly once"


async def test_racing_acquires_of_one_id_take_the_attempt_once(store: Store) -> None:
    # One id per call: the single-row compare-and-set, not the batch statement.
    tasks = await store.add_tasks([new_task(URL) for _ in range(10)])
    now = time.time() + 0.001
    rounds = await asyncio.gather(
        *(store.acquire([t.id], now=now) for t in tasks for _ in range(5))
    )
    taken = [t for r in rounds for t in r]
    assert sorted(t.id for t in taken) == [t.id for t in tasks], "each task acquired once"
    assert {t.retry_count for t in taken} == {1}


@pytest.mark.parametrize("backend", [backend_param("postgres-redis")], indirect=True)
async def test_acquiring_one_id_waits_for_a_held_row_then_rechecks_it(store: Store) -> None:
    a, b = await store.add_tasks([new_task(URL, timeout=30) for _ in range(2)])
    now = time.time() + 0.001
    for task, commit in ((a, True), (b, False)):
        async with store.engine.connect() as conn:
            # Another worker's acquire of the same attempt, not yet committed.
            tx = await conn.begin()
            await conn.execute(
                sa.text("UPDATE tasks SET retry_count = 1, due = due + 1000 WHERE id = :id"),
                {"id": task.id},
            )
            racer = asyncio.create_task(store.acquire([task.id], now=now))
            await asyncio.sleep(0.3)
            assert not racer.done(), "it waits for the row"
            await (tx.commit() if commit else tx.rollback())
        taken = await asyncio.wait_for(racer, 5)
        if commit:
            # Re-checked on the newest version: taken meanwhile, so not taken again.
            assert taken == []
        else:
            # The other attempt never happened: this one takes it.
            assert [(t.id, t.retry_count) for t in taken] == [(task.id, 1)]
        stored = await store.get_task(task.id)
        assert stored is not None and stored.retry_count == 1


async def test_a_stale_attempt_cannot_overwrite_the_newer_one(store: Store) -> None:
    [task] = await store.add_tasks([new_task(URL, timeout=5)])
    now = time.time()
    [first] = await store.acquire([task.id], now=now)
    # The first attempt's lease runs out (its worker is slow or dead); a second begins.
    [second] = await store.acquire([task.id], now=first.due + 0.01)
    assert (first.retry_count, second.retry_count) == (1, 2)

    # The first attempt answers late: not recorded.
    assert await store.record([outcome(task.id, 1, "COMPLETED")]) == [False]
    stored = await store.get_task(task.id)
    assert stored is not None and (stored.status, stored.retry_count) == ("PENDING", 2)

    # The current attempt records.
    assert await store.record([outcome(task.id, 2, "FAILED")]) == [True]
    stored = await store.get_task(task.id)
    assert stored is not None and (stored.status, stored.last_status) == ("FAILED", 200)

    # Nothing may overwrite a finished task, not even its own attempt again.
    assert await store.record([outcome(task.id, 2, "COMPLETED")]) == [False]
    stored = await store.get_task(task.id)
    assert stored is not None and stored.status == "FAILED"


async def test_record_batches_mix_stale_and_current(store: Store) -> None:
    tasks = await store.add_tasks([new_task(URL) for _ in range(4)])
    now = time.time()
    taken = await store.acquire([t.id for t in tasks], now=now)
    by_id = {t.id: t for t in taken}
    outcomes = [
        outcome(tasks[0].id, by_id[tasks[0].id].retry_count),
        outcome(tasks[1].id, by_id[tasks[1].id].retry_count - 1),  # stale
        outcome(tasks[2].id, by_id[tasks[2].id].retry_count, "PENDING", due=now + 5),
        outcome(tasks[3].id, by_id[tasks[3].id].retry_count + 1),  # from the future
    ]
    assert await store.record(outcomes) == [True, False, True, False]
    statuses = [(await store.get_task(t.id)).status for t in tasks]  # type: ignore[union-attr]
    assert statuses == ["COMPLETED", "PENDING", "PENDING", "PENDING"]
    retried = await store.get_task(tasks[2].id)
    assert retried is not None and retried.due == pytest.approx(now + 5)


async def test_record_answers_for_each_outcome_in_the_order_given(store: Store) -> None:
    # Given tasks whose attempts are listed out of id order, and one task whose stale
    # attempt's outcome shares the batch with its current attempt's
    a, b, c = await store.add_tasks([new_task(URL, timeout=5) for _ in range(3)])
    now = time.time()
    taken = {t.id: t for t in await store.acquire([a.id, b.id, c.id], now=now)}
    [b_again] = await store.acquire([b.id], now=taken[b.id].due + 0.01)
    outcomes = [
        outcome(c.id, 1),
        outcome(b.id, 2, "FAILED"),
        outcome(a.id, 2),  # from the future
        outcome(b.id, 1),  # stale: b's lease ran out, attempt 2 holds it
        outcome(a.id, 1, "PENDING", due=now + 5),
    ]
    # When they are recorded in one batch
    written = await store.record(outcomes)
    # Then the answer follows the order given, telling one task's attempts apart
    assert written == [True, True, False, False, True]
    stored = {t.id: await store.get_task(t.id) for t in (a, b, c)}
    assert {i: (t.status, t.retry_count) for i, t in stored.items() if t is not None} == {
        a.id: ("PENDING", 1),
        b.id: ("FAILED", 2),
        c.id: ("COMPLETED", 1),
    }
    assert b_again.retry_count == 2
    # And a batch of none answers nothing
    assert await store.record([]) == []


async def test_exhausted_tasks_are_not_acquired_but_failed(store: Store) -> None:
    # NTORQUE_MAX_RETRIES=2: three attempts, then the lease runs out with no answer.
    [task] = await store.add_tasks([new_task(URL, timeout=1)])
    now = time.time()
    for k in (1, 2, 3):
        [taken] = await store.acquire([task.id], now=now)
        assert taken.retry_count == k
        now = taken.due + 0.01
    assert await store.acquire([task.id], now=now) == []
    assert await store.due_ids(10, now=now) == []
    assert await store.fail_exhausted(now=now) == [task.created]
    stored = await store.get_task(task.id)
    assert stored is not None and stored.status == "FAILED" and stored.last_error
    assert await store.fail_exhausted(now=now) == []


async def test_fail_exhausted_leaves_running_leases_alone(store: Store) -> None:
    [task] = await store.add_tasks([new_task(URL, timeout=60)])
    now = time.time()
    for _ in range(3):
        [taken] = await store.acquire([task.id], now=now)
        now = taken.due + 0.01
    # The third attempt's lease is still running: it may yet answer.
    assert await store.fail_exhausted(now=now - 30) == []


async def test_due_ids_are_in_due_order_and_page(store: Store) -> None:
    tasks = await store.add_tasks([new_task(URL) for _ in range(6)])
    now = time.time()
    # Reverse the natural order: the later ids become due first.
    for i, task in enumerate(tasks):
        taken = await store.acquire([task.id], now=now + 0.001)
        assert taken
        await store.record([outcome(task.id, 1, "PENDING", due=now - 10 - i)])
    page1 = await store.due_ids(4, now=now)
    page2 = await store.due_ids(4, now=now, after=page1[-1])
    assert [i for _, i in page1 + page2] == [t.id for t in reversed(tasks)]
    assert [d for d, _ in page1 + page2] == sorted(d for d, _ in page1 + page2)


async def test_tasks_are_scoped_to_their_app(store: Store) -> None:
    app_a, _ = await store.create_app("a")
    app_b, _ = await store.create_app("b")
    [task] = await store.add_tasks([new_task(URL, app_id=app_a.id)])
    assert await store.get_task(task.id, app_a.id) is not None
    assert await store.get_task(task.id, app_b.id) is None
    assert await store.get_task(task.id) is not None
    assert await store.get_task(MAX_TASK_ID + 1) is None
    assert await store.get_task(0) is None


async def test_app_keys(store: Store) -> None:
    app, key = await store.create_app("keys")
    assert len(key) >= 32
    found = await store.app_for_key(key)
    assert found is not None and found.id == app.id
    assert await store.app_for_key(key + "x") is None
    assert await store.set_app_active("keys", False) == 1
    assert await store.app_for_key(key) is None
    assert await store.set_app_active("nope", False) == 0


async def test_backlog_counts_due_tasks(store: Store) -> None:
    await store.add_tasks([new_task(URL) for _ in range(3)])
    backlog = await store.backlog(now=time.time() + 2)
    assert backlog.due == 3
    assert backlog.oldest_due_age_s >= 2


async def test_a_failed_statement_does_not_quote_its_parameters(store: Store) -> None:
    # Store errors are logged: their text must not carry task bodies or headers.
    [task] = await store.add_tasks([new_task("http://h/x")])
    with pytest.raises(sa.exc.DBAPIError) as info:
        async with store.engine.begin() as conn:
            await conn.execute(
                sa.text("UPDATE tasks SET id = :other, body = :body WHERE id = :id"),
                {"other": "not a number", "body": b"s3cret body", "id": task.id},
            )
    assert "s3cret" not in str(info.value)
