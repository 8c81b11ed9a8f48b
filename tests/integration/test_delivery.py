"""Enqueue over HTTP → the hook gets the same request; status, Location and push agree.

Runs on both backends: embedded (SQLite + in-process) and production (PostgreSQL + Redis).
"""

from __future__ import annotations

import json

import httpx
import pytest

from ntorque.notify import Notifier
from ntorque.settings import Settings
from ntorque.store import Store
from tests.support import HookServer, new_task, run_burst, run_until_settled

BODIES = [
    pytest.param(bytes(range(256)) * 4, "application/octet-stream", id="binary"),
    pytest.param(b"\xff\xfe\x00\x80 not utf-8 \xc3\x28", "application/x-blob", id="non-utf8"),
    pytest.param("Grüße, 世界 — ünïcödé".encode(), "text/plain; charset=utf-8", id="utf8-text"),
    pytest.param("café crème".encode("latin-1"), "text/plain; charset=ISO-8859-1", id="latin1"),
    pytest.param(
        json.dumps({"a": [1, 2.5, None], "ü": "é"}, ensure_ascii=False).encode(),
        "application/json; charset=utf-8",
        id="json",
    ),
    pytest.param(b"a=1&b=%C3%A9&c=x+y", "application/x-www-form-urlencoded", id="form"),
]


@pytest.mark.parametrize(("body", "content_type"), BODIES)
async def test_hook_receives_the_same_request(
    api: httpx.AsyncClient,
    settings: Settings,
    store: Store,
    notifier: Notifier,
    hook_server: HookServer,
    body: bytes,
    content_type: str,
) -> None:
    url = hook_server.url("/hook", "x=1&y=%C3%A9")
    response = await api.post(
        "/",
        params={"url": url, "method": "PUT"},
        content=body,
        headers={
            "Content-Type": content_type,
            "NTORQUE-PASSTHROUGH-X-Custom": "value with spaces",
            "NTORQUE-PASSTHROUGH-Authorization": "Bearer hook-secret",
        },
    )
    assert response.status_code == 201, response.text
    task_id = response.json()["id"]
    assert response.json()["status"] == "PENDING"

    await run_until_settled(settings, store, notifier, [task_id])

    [call] = hook_server.calls("/hook")
    assert call.method == "PUT"
    assert call.query == "x=1&y=%C3%A9"
    assert call.body == body
    assert call.headers["Content-Type"] == content_type
    assert call.headers["X-Custom"] == "value with spaces"
    assert call.headers["Authorization"] == "Bearer hook-secret"
    assert call.headers["NTORQUE-TASK-ID"] == str(task_id)
    assert call.headers["NTORQUE-TASK-RETRY-COUNT"] == "0"
    assert call.headers["NTORQUE-TASK-RETRY-LIMIT"] == str(settings.max_retries)
    assert "NTORQUE_API_KEY" not in call.headers, "the client's key never reaches the hook"

    location = response.headers["Location"]
    assert location == f"{str(api.base_url).rstrip('/')}/tasks/{task_id}"
    shown = await api.get(location)
    assert shown.status_code == 200
    assert shown.json()["id"] == task_id
    assert shown.json()["status"] == "COMPLETED"
    assert shown.json()["retry_count"] == 1
    assert shown.json()["last_status_code"] == 200
    alias = await api.get(f"/task/{task_id}")
    assert alias.status_code == 200 and alias.json() == shown.json()


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "patch"])
async def test_each_method_is_replayed(
    api: httpx.AsyncClient,
    settings: Settings,
    store: Store,
    notifier: Notifier,
    hook_server: HookServer,
    method: str,
) -> None:
    response = await api.post(
        "/", params={"url": hook_server.url("/m"), "method": method}, content=b"payload"
    )
    assert response.status_code == 201
    await run_until_settled(settings, store, notifier, [response.json()["id"]])
    [call] = hook_server.calls("/m")
    assert call.method == method.upper()
    assert call.body == b"payload"


async def test_no_content_type_sends_none(
    api: httpx.AsyncClient,
    settings: Settings,
    store: Store,
    notifier: Notifier,
    hook_server: HookServer,
) -> None:
    response = await api.post(
        "/", params={"url": hook_server.url("/plain")}, content=b"", headers={"Content-Type": ""}
    )
    assert response.status_code == 201
    await run_until_settled(settings, store, notifier, [response.json()["id"]])
    [call] = hook_server.calls("/plain")
    assert call.body == b""
    assert "Content-Type" not in call.headers


async def test_task_json_shape(api: httpx.AsyncClient, hook_server: HookServer) -> None:
    response = await api.post("/", params={"url": hook_server.url(), "timeout": "7"})
    task = response.json()
    assert set(task) >= {
        "id",
        "url",
        "method",
        "status",
        "retry_count",
        "timeout",
        "due",
        "created",
        "modified",
        "last_status_code",
        "last_error",
    }
    assert (task["url"], task["method"], task["timeout"], task["retry_count"]) == (
        hook_server.url(),
        "POST",
        7,
        0,
    )
    assert task["due"].endswith("+00:00"), "ISO-8601 with a timezone"


async def test_push_rings_for_pending_tasks_only(
    api: httpx.AsyncClient,
    settings: Settings,
    store: Store,
    notifier: Notifier,
    hook_server: HookServer,
    app_key: str,
) -> None:
    # A client that writes tasks itself: the row exists, but nobody rang.
    app = await store.app_for_key(app_key)
    assert app is not None
    [task] = await store.add_tasks([new_task(hook_server.url("/pushed"), app_id=app.id)])
    assert await notifier.pending() == 0

    pushed = await api.post(f"/tasks/{task.id}/push")
    assert pushed.status_code == 201
    assert pushed.headers["Location"].endswith(f"/tasks/{task.id}")
    assert await notifier.pending() == 1

    await run_until_settled(settings, store, notifier, [task.id])
    assert hook_server.count("/pushed") == 1

    # Pushing a finished task neither rings nor re-runs it.
    again = await api.post(f"/task/{task.id}/push")
    assert again.status_code == 201
    assert again.json()["status"] == "COMPLETED"
    assert await notifier.pending() == 0
    await run_burst(settings, store, notifier)
    assert hook_server.count("/pushed") == 1
    done = await store.get_task(task.id)
    assert done is not None and done.retry_count == 1


async def test_many_tasks_are_each_delivered_once(
    api: httpx.AsyncClient,
    settings: Settings,
    store: Store,
    notifier: Notifier,
    hook_server: HookServer,
) -> None:
    import asyncio

    responses = await asyncio.gather(
        *(
            api.post("/", params={"url": hook_server.url(f"/n{i}")}, content=str(i).encode())
            for i in range(40)
        )
    )
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == 40
    await run_until_settled(settings, store, notifier, ids)
    for i in range(40):
        [call] = hook_server.calls(f"/n{i}")
        assert call.body == str(i).encode()
