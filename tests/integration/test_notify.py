"""The doorbell, on every backend: Redis list, in-process, and none (polling)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from ntorque import notify
from ntorque.notify import Notifier, NotifyError, RedisNotifier, create_notifier
from ntorque.settings import Settings
from ntorque.store import Store
from tests.conftest import ALL_BACKENDS, Backend, backend_param
from tests.support import (
    REDIS_URL,
    HookServer,
    api_client,
    count_tasks,
    free_port,
    gather_limited,
    make_settings,
    silent_server,
    wait_until,
    worker_running,
)

RINGING = [backend_param(n) for n in ("sqlite-local", "postgres-redis")]


@pytest.mark.parametrize("backend", RINGING, indirect=True)
async def test_notify_then_wait_in_order(notifier: Notifier) -> None:
    assert await notifier.pending() == 0
    await notifier.notify([5, 3, 9])
    await notifier.notify([])
    assert await notifier.pending() == 3
    assert await notifier.wait(2, 1.0) == [5, 3]
    assert await notifier.wait(10, 1.0) == [9]
    assert await notifier.pending() == 0


@pytest.mark.parametrize("backend", RINGING, indirect=True)
async def test_notify_upto_rings_in_order_up_to_the_limit(notifier: Notifier) -> None:
    # More ids than one Lua unpack takes, and a limit that cuts the last slice short.
    assert await notifier.notify_upto(list(range(1, 2501)), 2200) == 2200
    assert await notifier.pending() == 2200
    assert await notifier.notify_upto([9999], 2200) == 0, "full: nothing more is rung"
    assert await notifier.notify_upto([], 5000) == 0
    assert await notifier.wait(3000, 1.0) == list(range(1, 2201))
    assert await notifier.notify_upto([7, 8], 1) == 1
    assert await notifier.wait(10, 1.0) == [7]


@pytest.mark.parametrize("backend", RINGING, indirect=True)
@pytest.mark.ntorque_env(NTORQUE_NOTIFY_BACKLOG_LIMIT="5")
async def test_notify_drops_ids_past_the_backlog_limit(notifier: Notifier) -> None:
    # Given a channel filled past its limit in one push
    await notifier.notify([1, 2, 3])
    await notifier.notify([4, 5, 6, 7])
    assert await notifier.pending() == 5, "the oldest five are kept"
    # When more come while it is full, they are dropped
    await notifier.notify([8])
    assert await notifier.pending() == 5
    # When workers take two, the next push fills the room left, and no more
    assert await notifier.wait(2, 1.0) == [1, 2]
    await notifier.notify([9, 10, 11])
    assert await notifier.wait(10, 1.0) == [3, 4, 5, 9, 10]
    # Then once there is room for a whole push, pushes go through as before
    await notifier.notify([12])
    await notifier.notify([13, 14, 15, 16, 17, 18])
    assert await notifier.wait(10, 1.0) == [12, 13, 14, 15, 16]


@pytest.mark.parametrize("backend", RINGING, indirect=True)
@pytest.mark.ntorque_env(NTORQUE_NOTIFY_BACKLOG_LIMIT="30", NTORQUE_AUTHENTICATE="false")
async def test_enqueues_past_the_backlog_limit_are_stored_and_delivered_all_the_same(
    settings: Settings, store: Store, notifier: Notifier, hook_server: HookServer
) -> None:
    url = hook_server.script("/h", 200)
    # Given no worker running, when 100 tasks are enqueued
    async with api_client(settings, store, notifier) as client:

        async def enqueue(n: int) -> int:
            answer = await client.post("/", params={"url": url}, content=str(n).encode())
            assert answer.status_code == 201, answer.text
            return int(answer.json()["id"])

        ids = await gather_limited(enqueue(n) for n in range(100))
    # Then the channel holds no more than its limit
    assert await notifier.pending() == 30
    # And a worker delivers every task, the unrung ones found by its polls
    async with worker_running(settings, store, notifier):
        await wait_until(lambda: hook_server.count("/h") >= 100, timeout_s=20, message="all")
    assert sorted(int(c.body) for c in hook_server.calls("/h")) == list(range(100))
    for task_id in ids:
        stored = await store.get_task(task_id)
        assert stored is not None and stored.status == "COMPLETED"


@pytest.mark.parametrize("backend", RINGING, indirect=True)
async def test_wait_returns_empty_after_its_timeout(notifier: Notifier) -> None:
    async with asyncio.timeout(10):
        assert await notifier.wait(10, 0.1) == []


@pytest.mark.parametrize("backend", RINGING, indirect=True)
async def test_a_waiting_worker_wakes_on_notify(notifier: Notifier) -> None:
    waiting = asyncio.create_task(notifier.wait(10, 5.0))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await notifier.notify([42])
    async with asyncio.timeout(5):
        assert await waiting == [42]


@pytest.mark.parametrize("backend", [backend_param("sqlite-poll")], indirect=True)
async def test_polling_notifier_is_silent(notifier: Notifier) -> None:
    assert notifier.rings is False
    await notifier.notify([1, 2])
    assert await notifier.pending() == 0
    assert await notifier.wait(10, 0.01) == []


@pytest.mark.parametrize("backend", [backend_param(n) for n in ALL_BACKENDS], indirect=True)
def test_create_notifier_picks_the_backend(backend: Backend) -> None:
    in_process = backend.notify != "poll"
    notifier = create_notifier(backend.settings, in_process=in_process)
    assert notifier.kind == backend.notify


@pytest.mark.redis
async def test_redis_ignores_malformed_items(redis_channel: str) -> None:
    settings = make_settings(REDIS_URL=REDIS_URL, NTORQUE_REDIS_CHANNEL=redis_channel)
    notifier = RedisNotifier(settings)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.rpush(redis_channel, b"7", b"junk", b"8")
        assert await notifier.wait(10, 1.0) == [7, 8]
    finally:
        await client.aclose()
        await notifier.close()


async def test_redis_down_raises_notify_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "PAUSE_AFTER_FAILURE_S", 0.3)
    settings: Settings = make_settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    notifier = RedisNotifier(settings)
    try:
        assert notifier.available()
        with pytest.raises(NotifyError):
            await notifier.notify([1])
        # A failure makes it unavailable for the pause, then it may be tried again
        assert not notifier.available()
        await asyncio.sleep(0.4)
        assert notifier.available()
        with pytest.raises(NotifyError):
            await notifier.pending()
        with pytest.raises(NotifyError):
            await notifier.wait(1, 0.1)
    finally:
        await notifier.close()


@contextlib.contextmanager
def tls_redis_server(tmp_path: Path) -> Iterator[str]:
    """A private redis-server speaking only TLS, with a self-signed certificate (as Heroku
    Redis's is) for a name that is not its address; yields its ``rediss://`` URL."""
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.fail("the rediss:// test needs the openssl and redis-server binaries")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=redis.example", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    server = subprocess.Popen(
        [
            *("redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
            *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
            *("--tls-auth-clients", "no", "--save", "", "--appendonly", "no"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"rediss://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.redis  # a private redis-server binary, built with TLS
async def test_rediss_with_a_self_signed_certificate_works_as_given(tmp_path: Path) -> None:
    # SPEC §2: Heroku Redis hands out rediss:// URLs with self-signed certificates.
    with tls_redis_server(tmp_path) as url:
        notifier = RedisNotifier(make_settings(REDIS_URL=url))
        try:
            for _ in range(100):  # until the server listens
                with contextlib.suppress(NotifyError):
                    await notifier.pending()
                    break
                await asyncio.sleep(0.05)
            await notifier.notify([4, 2])
            assert await notifier.pending() == 2
            assert await notifier.wait(10, 1.0) == [4, 2]
        finally:
            await notifier.close()

        # Verification asked for: the self-signed certificate is refused.
        strict = RedisNotifier(make_settings(REDIS_URL=url, NTORQUE_REDIS_TLS_VERIFY="true"))
        try:
            with pytest.raises(NotifyError, match="certificate verify failed"):
                await strict.notify([1])
        finally:
            await strict.close()


def web_notify_failures() -> float:
    return REGISTRY.get_sample_value("ntorque_notify_failures_total", {"role": "web"}) or 0.0


@pytest.mark.parametrize("backend", [backend_param("postgres-redis")], indirect=True)
@pytest.mark.ntorque_env(NTORQUE_AUTHENTICATE="false")
async def test_after_the_doorbell_fails_enqueues_skip_it_for_a_while(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notify, "PAUSE_AFTER_FAILURE_S", 1.0)
    # Given the web's Redis accepting connections but never answering
    async with silent_server() as port:
        notifier = RedisNotifier(make_settings(REDIS_URL=f"redis://127.0.0.1:{port}/0"))
        try:
            async with api_client(store.settings, store, notifier) as client:

                async def enqueue() -> int:
                    answer = await client.post("/", params={"url": "http://127.0.0.1:9/x"})
                    assert answer.status_code == 201, answer.text
                    return int(answer.json()["id"])

                before = web_notify_failures()
                # When five tasks are enqueued one after the other
                ids = [await enqueue() for _ in range(5)]
                # Then each is stored and answered 201, and only the first waited for the
                # silent doorbell: the others, within the pause, skipped it
                assert web_notify_failures() - before == 1
                # And once the pause is over, an enqueue tries the doorbell again
                await asyncio.sleep(1.1)
                ids.append(await enqueue())
                assert web_notify_failures() - before == 2
        finally:
            await notifier.close()
    assert await count_tasks(store) == 6
    assert len(set(ids)) == 6
