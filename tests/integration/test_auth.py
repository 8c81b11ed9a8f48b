"""Authentication and app isolation over real HTTP, on both backends."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from ntorque.notify import Notifier
from ntorque.settings import Settings
from ntorque.store import Store
from tests.support import count_tasks, new_task, serve_app

HOOK = "http://127.0.0.1:9/hook"


async def test_missing_unknown_and_inactive_keys_are_refused(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    app, key = await store.create_app("soon-inactive")
    [task] = await store.add_tasks([new_task(HOOK, app_id=app.id)])
    async with serve_app(settings, store, notifier) as base, httpx.AsyncClient(base_url=base) as c:
        assert (await c.get("/")).status_code == 200, "the banner needs no key"
        good = await c.get(f"/tasks/{task.id}", headers={"NTORQUE_API_KEY": key})
        assert good.status_code == 200
        await store.set_app_active("soon-inactive", False)
        attempts = [
            {},
            {"NTORQUE_API_KEY": ""},
            {"NTORQUE_API_KEY": "0" * 40},
            {"NTORQUE-API-KEY": "x" * 40},
            {"Authorization": "Bearer " + "f" * 40},
            {"Authorization": f"Basic {key}"},
            {"NTORQUE_API_KEY": key},  # the app is inactive now
        ]
        for headers in attempts:
            for method, path in [
                ("POST", f"/?url={HOOK}"),
                ("GET", f"/tasks/{task.id}"),
                ("POST", f"/tasks/{task.id}/push"),
            ]:
                response = await c.request(method, path, headers=headers)
                assert response.status_code == 401, (headers, method, path)
                assert response.headers["content-type"].startswith("application/json")
                assert response.json()["error"]
    assert await count_tasks(store) == 1


@pytest.mark.parametrize(
    "spelling",
    ["NTORQUE_API_KEY", "NTORQUE-API-KEY", "ntorque-api-key", "Authorization"],
)
async def test_every_key_header_spelling_works(
    settings: Settings, store: Store, notifier: Notifier, spelling: str
) -> None:
    _, key = await store.create_app("spellings")
    value = f"Bearer {key}" if spelling == "Authorization" else key
    async with serve_app(settings, store, notifier) as base, httpx.AsyncClient(base_url=base) as c:
        created = await c.post("/", params={"url": HOOK}, headers={spelling: value})
        assert created.status_code == 201, created.text
        shown = await c.get(created.headers["Location"], headers={spelling: value})
        assert shown.status_code == 200 and shown.json()["id"] == created.json()["id"]


async def test_an_app_sees_only_its_own_tasks(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    _, key_a = await store.create_app("a")
    _, key_b = await store.create_app("b")
    async with serve_app(settings, store, notifier) as base, httpx.AsyncClient(base_url=base) as c:
        a = {"NTORQUE_API_KEY": key_a}
        b = {"NTORQUE_API_KEY": key_b}
        task_id = (await c.post("/", params={"url": HOOK}, headers=a)).json()["id"]
        rung = await notifier.pending()
        for path in (f"/tasks/{task_id}", f"/task/{task_id}"):
            assert (await c.get(path, headers=a)).status_code == 200
            other = await c.get(path, headers=b)
            assert other.status_code == 404 and other.json()["error"]
        pushed = await c.post(f"/tasks/{task_id}/push", headers=b)
        assert pushed.status_code == 404
        assert await notifier.pending() == rung, "a refused push rings nobody"
        assert (await c.post(f"/tasks/{task_id}/push", headers=a)).status_code == 201


@pytest.mark.ntorque_env(NTORQUE_AUTHENTICATE="false")
async def test_authentication_off_lets_everyone_in(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    async with serve_app(settings, store, notifier) as base, httpx.AsyncClient(base_url=base) as c:
        created = await c.post("/", params={"url": HOOK})
        assert created.status_code == 201
        task_id = created.json()["id"]
        assert (await c.get(f"/tasks/{task_id}")).status_code == 200
        assert (await c.post(f"/tasks/{task_id}/push")).status_code == 201
        # A made-up key is simply ignored.
        assert (
            await c.get(f"/tasks/{task_id}", headers={"NTORQUE_API_KEY": "x"})
        ).status_code == 200


async def test_concurrent_requests_share_one_lookup_of_a_key(
    settings: Settings, store: Store, notifier: Notifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cache keeps nothing (FAST_ENV: 0 s), as when a busy key's entry has just run out.
    app, key = await store.create_app("busy")
    [task] = await store.add_tasks([new_task(HOOK, app_id=app.id)])
    lookups: list[str] = []
    real = store.app_for_key

    async def slow_lookup(k: str) -> Any:
        lookups.append(k)
        await asyncio.sleep(0.3)  # long enough for every request below to arrive meanwhile
        return await real(k)

    monkeypatch.setattr(store, "app_for_key", slow_lookup)
    async with serve_app(settings, store, notifier) as base, httpx.AsyncClient(base_url=base) as c:
        good, bad = {"NTORQUE_API_KEY": key}, {"NTORQUE_API_KEY": "0" * 40}
        answers = await asyncio.gather(
            *(c.get(f"/tasks/{task.id}", headers=good) for _ in range(20)),
            *(c.get(f"/tasks/{task.id}", headers=bad) for _ in range(10)),
        )
        assert [r.status_code for r in answers] == [200] * 20 + [401] * 10
        assert sorted(lookups) == sorted([key, "0" * 40]), "one lookup per key"
        # Once it has finished, the next request looks the key up again (nothing cached).
        assert (await c.get(f"/tasks/{task.id}", headers=good)).status_code == 200
        assert lookups.count(key) == 2
