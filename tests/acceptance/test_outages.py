"""Redis and PostgreSQL outages, with the Procfile's processes running as on Heroku.

Redis is only a doorbell: while it is down, stopped, restarted or flushed, tasks are still
stored (201) and delivered by the clock's requeue and the workers' database poll.
PostgreSQL is the source of truth: when it cannot be reached the web process answers a
JSON 503 within about NTORQUE_DB_TIMEOUT, never hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from tests import support
from tests.acceptance.harness import (
    Api,
    HookServer,
    Proc,
    Processes,
    base_env,
    create_app,
    free_port,
    get_text,
    heroku_database_url,
    metric_total,
    start_role,
    start_web,
    wait_for,
    wait_output,
)

# What the client allows the web process to answer in: generous on a loaded machine, but
# bounded, and far below "hangs until the TCP connection dies".
CLIENT_TIMEOUT_S = 20.0


# -- Redis ----------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
async def test_redis_unreachable_at_enqueue_the_task_is_stored_and_the_clock_rings_for_it(
    processes: Processes, hook: HookServer, pg_url: str, redis_channel: str, tmp_path: Path
) -> None:
    """Web's Redis is unreachable; workers and clock have theirs. The clock's ring delivers."""
    env = base_env(
        tmp_path,
        DATABASE_URL=heroku_database_url(pg_url),
        REDIS_URL=support.REDIS_URL,
        NTORQUE_REDIS_CHANNEL=redis_channel,
        # The worker polls the database only every 30 s: a prompt delivery needs a ring.
        NTORQUE_POLL_INTERVAL="30",
    )
    web_env = {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    api = Api(await start_web(processes, web_env), await create_app(processes, env))
    try:
        worker = await start_role(processes, "worker", env, "worker")
        await start_role(processes, "clock", env, "clock")

        ids = await api.enqueue_many(hook.url + "/ok", 5)  # each answered 201

        await api.wait_status(ids, "COMPLETED", timeout_s=20)
        # The published metrics live in Redis too: the cluster route says it cannot read them.
        async with httpx.AsyncClient(base_url=api.base, timeout=10) as client:
            cluster = await client.get("/metrics/cluster")
        assert cluster.status_code == 503, cluster.text
        assert cluster.json()["code"] == "unavailable"
    finally:
        await api.close()
    assert all(hook.count(task_id) == 1 for task_id in ids)
    web = next(p for p in processes.started if p.name == "web")
    assert "action=notify failed" in web.output()
    clock = next(p for p in processes.started if p.name == "clock")
    assert "action=requeue count=" in clock.output()
    # The worker sits in a 30 s BLPOP; it need not be polite about it.
    await processes.stop(worker, grace_s=0.5)


class PrivateRedis:
    """A redis-server of this test's own on a free port, to stop, restart and flush."""

    def __init__(self, processes: Processes, env: dict[str, str]) -> None:
        self.processes = processes
        self.env = env
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Proc | None = None

    async def start(self) -> None:
        command = f"redis-server --port {self.port} --bind 127.0.0.1 --save '' --appendonly no"
        self.proc = self.processes.start("redis-server", command, self.env)
        client = aioredis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            for _ in range(100):
                with contextlib.suppress(RedisError, OSError):
                    if await client.ping():
                        return
                assert self.proc.returncode is None, self.proc.output()
                await asyncio.sleep(0.1)
        finally:
            await client.aclose()
        raise AssertionError("the private redis-server did not answer PING")

    async def stop(self) -> None:
        assert self.proc is not None
        await self.processes.stop(self.proc)

    async def flushdb(self) -> int:
        client = aioredis.Redis.from_url(self.url, socket_timeout=5)
        try:
            length = int(await client.llen("ntorque"))
            await client.flushdb()
            return length
        finally:
            await client.aclose()


@pytest.fixture
async def private_redis(processes: Processes, tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    redis = PrivateRedis(processes, base_env(tmp_path))
    await redis.start()
    yield redis  # the processes fixture stops it


@pytest.mark.postgres
@pytest.mark.redis  # a private redis-server binary
@pytest.mark.slow
async def test_redis_stopped_restarted_and_flushed_mid_run_every_task_is_delivered(
    processes: Processes,
    hook: HookServer,
    pg_url: str,
    private_redis: PrivateRedis,
    tmp_path: Path,
) -> None:
    env = base_env(
        tmp_path,
        DATABASE_URL=heroku_database_url(pg_url),
        REDIS_URL=private_redis.url,
        NTORQUE_WORKER_CONCURRENCY="4",
    )
    api = Api(await start_web(processes, env), await create_app(processes, env))
    delivered: list[int] = []
    try:
        await start_role(processes, "worker", env, "worker")
        await start_role(processes, "clock", env, "clock")

        # Up: the normal path.
        ids = await api.enqueue_many(hook.url + "/ok", 10)
        await api.wait_status(ids, "COMPLETED")
        delivered += ids

        # Down: every enqueue still answers 201, every task is still delivered.
        await private_redis.stop()
        ids = await api.enqueue_many(hook.url + "/ok", 10)
        await api.wait_status(ids, "COMPLETED")
        delivered += ids

        # Back, on the same port: the processes reconnect by themselves.
        await private_redis.start()
        ids = await api.enqueue_many(hook.url + "/ok", 10)
        await api.wait_status(ids, "COMPLETED")
        delivered += ids

        # Flushed with notifications queued (4 slow hooks at a time, 40 tasks).
        ids = await api.enqueue_many(hook.url + "/slow/100", 40)
        queued = await private_redis.flushdb()
        print(f"FLUSHDB dropped {queued} queued notifications")
        await api.wait_status(ids, "COMPLETED")
        delivered += ids
    finally:
        await api.close()

    per_task = hook.per_task()
    assert [task_id for task_id in delivered if per_task[task_id] < 1] == []
    worker = next(p for p in processes.started if p.name == "worker")
    assert "notification channel unavailable" in worker.output()


# -- PostgreSQL -----------------------------------------------------------------------------


async def assert_prompt_503(base: str, *, key: str | None) -> None:
    headers = {"NTORQUE-API-KEY": key} if key else {}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=CLIENT_TIMEOUT_S) as c:
        # Liveness needs no database.
        assert (await c.get("/")).status_code == 200
        for response in await asyncio.gather(
            c.post("/", params={"url": "http://127.0.0.1:9/hook"}, content=b"x"),
            c.get("/tasks/1"),
            c.post("/tasks/1/push"),
        ):
            assert response.status_code == 503, (response.request.url, response.text)
            assert response.headers["content-type"].startswith("application/json")
            assert response.json()["code"] == "unavailable"
            assert response.headers.get("retry-after")


async def test_postgres_refusing_connections_web_answers_503_json_promptly(
    processes: Processes, tmp_path: Path
) -> None:
    dead = f"postgres://postgres@127.0.0.1:{free_port()}/ntorque"
    env = base_env(tmp_path, DATABASE_URL=dead, NTORQUE_DB_TIMEOUT="2")

    base = await start_web(processes, env)

    await assert_prompt_503(base, key="0" * 40)
    # And the metrics say so: three failed database calls, three 503 answers
    exposition = await get_text(base + "/metrics")
    assert metric_total(exposition, "ntorque_database_errors_total", role="web") == 3
    answered = metric_total(exposition, "ntorque_api_errors_total", status="503")
    assert answered == 3


async def test_postgres_black_hole_web_answers_503_json_within_the_db_timeout(
    processes: Processes, tmp_path: Path
) -> None:
    """The server accepts TCP but never answers: requests must still end, in a 503."""
    async with support.silent_server() as port:
        env = base_env(
            tmp_path,
            DATABASE_URL=f"postgres://postgres@127.0.0.1:{port}/ntorque",
            NTORQUE_DB_TIMEOUT="2",
            # Straight to the insert path (no key lookup first).
            NTORQUE_AUTHENTICATE="false",
        )
        base = await start_web(processes, env)

        await assert_prompt_503(base, key=None)

        web = next(p for p in processes.started if p.name == "web")
        assert await processes.stop(web) in (0, -signal.SIGTERM)
        await wait_output(web, "Application shutdown complete", timeout_s=1)


class PrivatePostgres:
    """A PostgreSQL server of this test's own on a free port, to stop and start at will.

    The shared server is never stopped. As root (CI), the server runs as ``postgres``:
    initdb refuses to run as root.
    """

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        initdb = found[-1] if found else shutil.which("initdb")
        assert initdb, "initdb not found: install the PostgreSQL server package"
        self.bin = Path(initdb).parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ntorque-private-pg-"))
        self.data = self.dir / "data"
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [*self._as_user, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N"
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.dir / "server.log")
        pg_ctl = str(self.bin / "pg_ctl")
        self._run(pg_ctl, "-D", str(self.data), "-o", options, "-l", log, "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        pg_ctl = str(self.bin / "pg_ctl")
        subprocess.run(
            [*self._as_user, pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()


async def migrated_env(
    processes: Processes, server: PrivatePostgres, tmp_path: Path, **extra: str
) -> tuple[dict[str, str], str]:
    """The dyno environment on the private server, after the release phase; and an API key."""
    env = base_env(tmp_path, DATABASE_URL=server.url, NTORQUE_DB_TIMEOUT="2", **extra)
    release = await processes.run("release", processes.procfile["release"], env)
    assert release.returncode == 0, release.output()
    return env, await create_app(processes, env)


@pytest.mark.postgres  # a private PostgreSQL server
@pytest.mark.slow
async def test_postgres_restarted_the_first_requests_after_it_is_back_succeed(
    processes: Processes, private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    """Connections pooled before the restart are closed: none may turn into a 503."""
    env, key = await migrated_env(processes, private_postgres, tmp_path)
    api = Api(await start_web(processes, env), key)
    try:
        task_id = await api.enqueue("http://127.0.0.1:9/hook")  # the pools hold connections

        private_postgres.stop()
        private_postgres.start()

        # Every route that reads through the pool, right away: 200, 201, never 503.
        assert (await api.task(task_id))["id"] == task_id
        response = await api.client.post(f"/tasks/{task_id}/push")
        assert response.status_code == 201, response.text
        await api.enqueue("http://127.0.0.1:9/hook")
    finally:
        await api.close()


@pytest.mark.postgres  # a private PostgreSQL server
@pytest.mark.slow
async def test_postgres_down_while_a_hook_answers_the_outcome_is_recorded_once_it_is_back(
    processes: Processes, hook: HookServer, private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    """The answer is kept and written when the database returns, not thrown away.

    One attempt only: an outcome given up on would leave the task to the clock, which
    fails it once the lease (the 30 s timeout) runs out, although the hook answered 200.
    """
    env, key = await migrated_env(
        processes,
        private_postgres,
        tmp_path,
        NTORQUE_MAX_RETRIES="0",
        NTORQUE_DEFAULT_TIMEOUT="30",
    )
    api = Api(await start_web(processes, env), key)
    try:
        worker = await start_role(processes, "worker", env, "worker")
        clock = await start_role(processes, "clock", env, "clock")
        ids = await api.enqueue_many(hook.url + "/slow/1000", 3)
        await wait_for(lambda: len(hook.deliveries) == 3, 10, "the three hook calls")

        private_postgres.stop()
        # Down well past the hook's answer and a few of the worker's retries.
        await asyncio.sleep(6)
        private_postgres.start()

        done = await api.wait_status(ids, "COMPLETED", timeout_s=15)
        # And the worker and the clock counted their failed database calls
        for proc in (worker, clock):
            assert proc.metrics_url is not None
            exposition = await get_text(proc.metrics_url)
            assert metric_total(exposition, "ntorque_database_errors_total", role=proc.name) > 0
    finally:
        await api.close()
    assert all(task["last_status_code"] == 200 for task in done.values())
    assert [hook.count(task_id) for task_id in ids] == [1, 1, 1]
