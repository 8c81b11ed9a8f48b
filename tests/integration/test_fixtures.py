"""The shared fixtures themselves work: backends, hook server, the served API."""

from __future__ import annotations

import httpx

from ntorque.notify import Notifier
from ntorque.settings import Settings
from ntorque.store import Store
from tests.conftest import Backend
from tests.support import HookServer, Reply, new_task, refused_url, run_until_settled


async def test_backend_round_trip(
    backend: Backend, settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    """Given a backend, a task added to its store is delivered by a burst worker."""
    url = hook_server.script("/ok", Reply(status=500), 200)
    [task] = await store.add_tasks([new_task(url, body=b"hi")])
    await notifier.notify([task.id])
    await run_until_settled(settings, store, notifier, [task.id])
    done = await store.get_task(task.id)
    assert done is not None and done.status == "COMPLETED" and done.retry_count == 2
    assert [r.body for r in hook_server.calls("/ok")] == [b"hi", b"hi"]
    assert store.dialect == ("postgresql" if backend.db == "postgres" else "sqlite")


async def test_api_fixture_serves(api: httpx.AsyncClient) -> None:
    """The served app answers its banner and refuses an unknown route with JSON."""
    assert (await api.get("/")).status_code == 200
    missing = await api.get("/nope")
    assert missing.status_code == 404 and "error" in missing.json()


async def test_refused_url_refuses() -> None:
    """refused_url() names a port nothing listens on."""
    async with httpx.AsyncClient() as client:
        try:
            await client.get(refused_url())
        except httpx.ConnectError:
            return
    raise AssertionError("expected a refused connection")
