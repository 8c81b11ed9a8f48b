"""The README's start command, ``ntorque run``, on a machine with no PostgreSQL and no Redis.

No DATABASE_URL, no REDIS_URL: an SQLite file and in-process notification. The first start
prints an API key once; stored pending tasks survive a restart and are then delivered.
"""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path
from typing import Any

import httpx

from tests.acceptance.harness import (
    REPO_ROOT,
    Api,
    HookServer,
    Processes,
    base_env,
    free_port,
    start_role,
    start_web,
    wait_for,
    wait_http,
    wait_output,
)

KEY_LINE = re.compile(r"^\s+([0-9a-f]{40})\s*$", re.MULTILINE)


async def start_run(processes: Processes, env: dict[str, str]) -> tuple[str, str]:
    """Start ``ntorque run``; (its base URL, its output once it listens)."""
    proc = processes.start("ntorque-run", "ntorque run", env)
    base = f"http://127.0.0.1:{env['PORT']}"
    output = await wait_output(proc, f"listening on {base}")
    await wait_http(base + "/", proc)
    return base, output


async def test_ntorque_run_without_database_or_redis_delivers_and_keeps_pending_tasks(
    processes: Processes, hook: HookServer, tmp_path: Path
) -> None:
    sqlite_path = tmp_path / "data" / "ntorque.sqlite3"
    env = base_env(
        tmp_path,
        PORT=str(free_port()),
        NTORQUE_SQLITE_PATH=str(sqlite_path),
        # A hook that is down is retried (quickly) for as long as this test needs.
        NTORQUE_MAX_RETRIES="1000",
    )
    assert "DATABASE_URL" not in env and "REDIS_URL" not in env

    base, output = await start_run(processes, env)
    keys = KEY_LINE.findall(output)
    assert len(keys) == 1, f"expected one API key on the first start:\n{output}"
    assert str(sqlite_path) in output  # it says where the data lives
    api = Api(base, keys[0])
    try:
        first = await api.enqueue(hook.url + "/ok", b"first")
        await api.wait_status([first], "COMPLETED")
        assert hook.count(first) == 1

        # A hook that is down: the tasks are attempted, refused, and stay PENDING.
        down = HookServer()
        pending = await api.enqueue_many(down.url + "/ok", 5)
        await wait_for_attempts(api, pending)
    finally:
        await api.close()

    run = processes.started[-1]
    assert await processes.stop(run) in (0, -signal.SIGTERM)
    assert sqlite_path.is_file()

    await down.start()
    try:
        env["PORT"] = str(free_port())
        base, output = await start_run(processes, env)
        assert KEY_LINE.findall(output) == [], "the key must be shown only on the first start"
        api = Api(base, keys[0])
        try:
            done = await api.wait_status(pending, "COMPLETED")
        finally:
            await api.close()
        assert all(down.count(task_id) == 1 for task_id in pending)
        assert all(done[task_id]["retry_count"] >= 2 for task_id in pending)
    finally:
        await down.stop()


async def wait_for_attempts(api: Api, task_ids: list[int]) -> None:
    """Wait until every task has been tried and refused at least once, and is PENDING."""
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(200):  # about 20 s at most
        seen = {task_id: await api.task(task_id) for task_id in task_ids}
        if all(t["retry_count"] >= 1 and t["last_error"] for t in seen.values()):
            break
        await asyncio.sleep(0.1)
    assert all(t["status"] == "PENDING" for t in seen.values()), seen
    assert all(t["retry_count"] >= 1 and t["last_error"] for t in seen.values()), seen


async def test_procfile_roles_without_database_or_redis_share_the_sqlite_file(
    processes: Processes, hook: HookServer, tmp_path: Path
) -> None:
    """The Procfile's own lines, as separate processes, with nothing but an SQLite file.

    With no Redis, web cannot ring the worker in another process: the worker finds the
    task by polling the database.
    """
    env = base_env(tmp_path, NTORQUE_SQLITE_PATH=str(tmp_path / "shared.sqlite3"))
    assert "DATABASE_URL" not in env and "REDIS_URL" not in env
    release = await processes.run("release", processes.procfile["release"], env)
    assert release.returncode == 0, release.output()
    created = await processes.run("create-app", "ntorque create-app --name solo", env)
    assert created.returncode == 0, created.output()
    key = created.stdout().strip()

    base = await start_web(processes, env)
    await start_role(processes, "worker", env, "worker")
    await start_role(processes, "clock", env, "clock")
    api = Api(base, key)
    try:
        ids = await api.enqueue_many(hook.url + "/ok", 10, parallel=5)
        done = await api.wait_status(ids, "COMPLETED")
    finally:
        await api.close()
    assert all(hook.count(task_id) == 1 for task_id in ids)
    assert all(done[task_id]["retry_count"] == 1 for task_id in ids)


async def test_two_workers_and_two_clocks_on_one_sqlite_file_never_answer_500(
    processes: Processes, hook: HookServer, tmp_path: Path
) -> None:
    """Separate processes taking SQLite's one write lock in turn: no 500, no crash, no error."""
    env = base_env(
        tmp_path,
        NTORQUE_SQLITE_PATH=str(tmp_path / "shared.sqlite3"),
        NTORQUE_CLEANUP_AFTER_DAYS="0",
        NTORQUE_CLEANUP_BATCH="5",
        NTORQUE_REQUEUE_INTERVAL="0.05",
        NTORQUE_POLL_INTERVAL="0.05",
    )
    await processes.run("release", processes.procfile["release"], env)
    created = await processes.run("create-app", "ntorque create-app --name many", env)
    assert created.returncode == 0, created.output()
    base = await start_web(processes, {**env, "WEB_CONCURRENCY": "2"})
    for i in range(2):
        await start_role(processes, "worker", env, f"worker{i}")
        await start_role(processes, "clock", env, f"clock{i}")
    answers: list[int] = []
    expected: dict[int, int] = {}
    async with httpx.AsyncClient(
        base_url=base, headers={"NTORQUE-API-KEY": created.stdout().strip()}, timeout=30
    ) as client:
        gate = asyncio.Semaphore(20)

        async def enqueue_and_read(i: int) -> None:
            path, attempts = [("/ok", 1), ("/flaky/2", 3)][i % 2]
            async with gate:
                posted = await client.post("/", params={"url": hook.url + path}, content=b"x")
                answers.append(posted.status_code)
                if posted.status_code == 201:
                    expected[posted.json()["id"]] = attempts
                    answers.append((await client.get(posted.headers["location"])).status_code)

        await asyncio.gather(*(enqueue_and_read(i) for i in range(200)))
    # Every task answered 201 and was readable (or already done and cleaned up: 404).
    assert set(answers) <= {201, 200, 404} and answers.count(201) == 200, sorted(set(answers))
    calls = sum(expected.values())
    await wait_for(lambda: len(hook.deliveries) >= calls, 60, f"{calls} hook calls", 0.1)
    await asyncio.sleep(0.5)  # a repeated attempt would arrive by now
    for task_id, attempts in expected.items():
        tried = [d.retry_count for d in hook.deliveries if d.task_id == task_id]
        assert sorted(tried) == list(range(attempts)), (task_id, tried)
    for proc in processes.started:
        if proc.name not in ("release", "create-app"):
            assert proc.returncode is None, proc.name
        assert " ERROR " not in proc.output() and "Traceback" not in proc.output(), proc.name


async def test_web_in_development_mode_reloads_on_code_changes_only(
    processes: Processes, tmp_path: Path
) -> None:
    # Given the Procfile's web line with MODE=development (auto-reload), on an SQLite file
    env = base_env(
        tmp_path,
        MODE="development",
        NTORQUE_SQLITE_PATH=str(tmp_path / "dev.sqlite3"),
        NTORQUE_AUTHENTICATE="false",
    )
    base = await start_web(processes, env)
    web = next(p for p in processes.started if p.name == "web")
    # When tasks are written (the SQLite file and its journal change)
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for _ in range(3):
            answer = await client.post("/", params={"url": "http://127.0.0.1:9/x"})
            assert answer.status_code == 201, answer.text
    await asyncio.sleep(1.0)  # longer than the reloader's debounce
    # Then the reloader watches the package's code alone, and saw no change
    package = REPO_ROOT / "ntorque"
    assert f"Will watch for changes in these directories: ['{package}']" in web.output()
    assert "change detected" not in web.output() and "changes detected" not in web.output()
    assert await processes.stop(web) in (0, -signal.SIGTERM)
