"""The Procfile's own lines, started as Heroku starts them, driven over HTTP like a user would.

release → web, worker, clock on PostgreSQL + Redis: an app is created with the CLI, tasks
complete, failing hooks are retried then fail, /metrics answers on web and worker, and a
SIGTERM'd worker lets its in-flight hook call finish and records it before exiting.
"""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.acceptance.harness import (
    Api,
    HookServer,
    Processes,
    get_text,
    metric_total,
    procfile_env,
    start_role,
    start_web,
    wait_output,
)
from tests.support import raw_http

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


async def empty_database(pg_url: str) -> None:
    """Undo the fixture's migration: the release phase must build the schema itself."""
    conn = await asyncpg.connect(pg_url, timeout=10)
    try:
        await conn.execute("DROP TABLE IF EXISTS tasks, applications, alembic_version CASCADE")
    finally:
        await conn.close()


def test_the_procfile_declares_the_four_heroku_process_types(processes: Processes) -> None:
    assert set(processes.procfile) == {"release", "web", "worker", "clock"}
    assert processes.procfile["release"] == "ntorque migrate"


async def test_procfile_release_web_worker_clock_end_to_end(
    processes: Processes, hook: HookServer, pg_url: str, redis_channel: str, tmp_path: Path
) -> None:
    await empty_database(pg_url)
    # No role may migrate on its own: the schema below is the release phase's work.
    env = procfile_env(tmp_path, pg_url, redis_channel, NTORQUE_AUTO_MIGRATE="false")

    release = await processes.run("release", processes.procfile["release"], env)
    assert release.returncode == 0, release.output()

    created = await processes.run("create-app", "ntorque create-app --name x", env)
    assert created.returncode == 0, created.output()
    key = created.stdout().strip()
    assert re.fullmatch(r"[0-9a-f]{40}", key), created.stdout()

    base = await start_web(processes, env)
    worker = await start_role(processes, "worker", env, "worker")
    clock = await start_role(processes, "clock", env, "clock")
    api = Api(base, key)
    try:
        # Unauthenticated callers are turned away; the key printed on stdout works.
        async with httpx.AsyncClient(base_url=base, timeout=10) as anonymous:
            refused = await anonymous.post("/", params={"url": hook.url + "/ok"})
            assert refused.status_code == 401
            assert refused.json()["code"] == "unauthorized"
        # A request the HTTP parser refuses (a malformed header name) gets a JSON error too.
        malformed = await raw_http(base, "POST", "/", [("NTORQUE-PASSTHROUGH-a(b)", "v")], b"")
        assert malformed.status == 400, malformed.body
        assert malformed.json()["code"] == "bad_request"

        ok = await api.enqueue(hook.url + "/ok", b'{"hello": "world"}')
        done = await api.wait_status([ok], "COMPLETED")
        assert done[ok]["retry_count"] == 1
        assert [d.retry_count for d in hook.deliveries if d.task_id == ok] == [0]

        failing = await api.enqueue(hook.url + "/fail")
        failed = await api.wait_status([failing], "FAILED")
        # NTORQUE_MAX_RETRIES=2: the first attempt and two retries, then FAILED.
        assert [d.retry_count for d in hook.deliveries if d.task_id == failing] == [0, 1, 2]
        assert failed[failing]["last_status_code"] == 500

        web_metrics = await get_text(base + "/metrics")
        assert metric_total(web_metrics, "ntorque_tasks_enqueued_total", app="x") == 2
        assert worker.metrics_url is not None
        worker_metrics = await get_text(worker.metrics_url)
        assert metric_total(worker_metrics, "ntorque_tasks_acquired_total") == 4

        # A slow hook is in flight when Heroku sends SIGTERM: the worker lets it finish,
        # records it, and exits cleanly within the grace period (NTORQUE_SHUTDOWN_GRACE=10).
        slow = await api.enqueue(hook.url + "/slow/2000")
        for _ in range(300):
            if hook.count(slow):
                break
            await asyncio.sleep(0.05)
        assert hook.count(slow) == 1, "the slow hook was never called"
        worker.signal(signal.SIGTERM)
        code = await worker.wait(20)
        assert code == 0, f"worker exit code {code}"
        call = next(d for d in hook.deliveries if d.task_id == slow)
        assert call.finished is not None, "the in-flight hook call was cut short"
        assert (await api.task(slow))["status"] == "COMPLETED"
        assert hook.count(slow) == 1
        await wait_output(worker, "worker stopped", timeout_s=1)
    finally:
        await api.close()

    assert await processes.stop(clock) == 0
    web = next(p for p in processes.started if p.name == "web")
    # uvicorn shuts down gracefully, then re-raises the captured SIGTERM on itself.
    assert await processes.stop(web) in (0, -signal.SIGTERM)
    await wait_output(web, "Application shutdown complete", timeout_s=1)


async def test_forwarded_headers_are_believed_only_from_forwarded_allow_ips(
    processes: Processes, pg_url: str, redis_channel: str, tmp_path: Path
) -> None:
    """Heroku's router is every peer (``*``); exposed directly, only the named proxies."""
    locations = {}
    for allowed in ("*", "10.9.8.7"):
        env = procfile_env(
            tmp_path,
            pg_url,
            redis_channel,
            NTORQUE_AUTHENTICATE="false",
            FORWARDED_ALLOW_IPS=allowed,
        )
        base = await start_web(processes, env, name=f"web-{allowed}")
        response = await raw_http(
            base, "POST", "/?url=http://127.0.0.1:9/hook", [("X-Forwarded-Proto", "https")], b"x"
        )
        assert response.status == 201, response.body
        locations[allowed] = response.headers["location"].split("://", 1)[0]
    assert locations == {"*": "https", "10.9.8.7": "http"}
