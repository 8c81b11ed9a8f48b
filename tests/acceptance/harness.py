"""Process-level harness: start the Procfile's own lines as Heroku does, drive them over HTTP.

Heroku runs each Procfile line with ``bash -c "<line>"`` in the app's root, with the config
vars (``DATABASE_URL`` as ``postgres://…``, ``REDIS_URL``, ``PORT``) in a small environment,
and sends SIGTERM, then SIGKILL after a grace period, to every process of the dyno. This
module does the same and captures each process's output to a file (conftest.py attaches
it to a failing test's report).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from aiohttp import web

REPO_ROOT = Path(__file__).resolve().parents[2]
# The virtual environment running the tests is the one the processes run from.
VENV_BIN = Path(sys.executable).parent
TERM_GRACE_S = 10.0
READY_TIMEOUT_S = 30.0

# Fast settings for every test process; a test overrides what it exercises.
FAST_ENV: dict[str, str] = {
    "NTORQUE_MIN_DUE_DELAY": "0.05",
    "NTORQUE_MAX_DUE_DELAY": "0.2",
    "NTORQUE_REQUEUE_INTERVAL": "0.2",
    "NTORQUE_POLL_INTERVAL": "0.2",
    "NTORQUE_DEFAULT_TIMEOUT": "5",
    "NTORQUE_MAX_RETRIES": "2",
    "NTORQUE_SHUTDOWN_GRACE": "10",
    "NTORQUE_DB_TIMEOUT": "5",
    "NTORQUE_AUTH_CACHE_SECONDS": "0",
    "NTORQUE_LOG_LEVEL": "info",
    # Other tests share the PostgreSQL server: keep each process's pool small.
    "SQLALCHEMY_POOL_SIZE": "3",
    "SQLALCHEMY_MAX_OVERFLOW": "2",
}


def read_procfile(path: Path = REPO_ROOT / "Procfile") -> dict[str, str]:
    """The Procfile's process types and their command lines."""
    lines: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, command = line.partition(":")
        assert sep, f"malformed Procfile line {raw!r}"
        lines[name.strip()] = command.strip()
    return lines


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def heroku_database_url(url: str) -> str:
    """The ``postgres://`` form Heroku hands out, whatever driver suffix the fixture used."""
    parts = urlsplit(url)
    return urlunsplit(("postgres", parts.netloc, parts.path, parts.query, ""))


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A minimal dyno-like environment: no variables leak in from the test runner."""
    env = {
        "PATH": f"{VENV_BIN}{os.pathsep}/usr/local/bin{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        **FAST_ENV,
    }
    env.update(extra)
    return env


@dataclass
class Proc:
    """One started process (its own process group, like a dyno) and its captured output."""

    name: str
    command: str
    popen: subprocess.Popen[bytes]
    log: Path
    out: Path | None = None
    # Where a worker's or clock's NTORQUE_METRICS_PORT serves (see start_role).
    metrics_url: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def output(self) -> str:
        """stderr (and stdout, unless split off), as written so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stdout(self) -> str:
        assert self.out is not None, "started without split_stdout"
        return self.out.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        """Signal the whole group, as Heroku signals every process of a dyno."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    async def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None if still running after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.popen.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.05)
        return self.popen.poll()


class Processes:
    """Starts processes, remembers them, and always stops them (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procfile = read_procfile()
        self.started: list[Proc] = []
        self._count: Counter[str] = Counter()

    def start(
        self, name: str, command: str, env: Mapping[str, str], *, split_stdout: bool = False
    ) -> Proc:
        """Run ``command`` the Heroku way: ``bash -c``, cwd = repo root, only ``env``.

        Output goes to one log file; with ``split_stdout``, stdout gets a file of its own
        (``Proc.stdout()``), for commands whose stdout is their answer.
        """
        self._count[name] += 1
        stem = self.workdir / f"{name}-{self._count[name]}"
        log = stem.with_suffix(".log")
        out_path = stem.with_suffix(".out") if split_stdout else None
        with contextlib.ExitStack() as files:
            err = files.enter_context(log.open("wb"))
            out = files.enter_context(out_path.open("wb")) if out_path else err
            popen = subprocess.Popen(
                ["bash", "-c", command],
                cwd=REPO_ROOT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        proc = Proc(name=name, command=command, popen=popen, log=log, out=out_path)
        self.started.append(proc)
        return proc

    def role(self, role: str, env: Mapping[str, str], *, name: str | None = None) -> Proc:
        """Start the Procfile's line for ``role``."""
        return self.start(name or role, self.procfile[role], env)

    async def run(
        self, name: str, command: str, env: Mapping[str, str], timeout_s: float = 60
    ) -> Proc:
        """Run a one-off command to completion (bounded) and return it; stdout split off."""
        proc = self.start(name, command, env, split_stdout=True)
        code = await proc.wait(timeout_s)
        if code is None:
            await self.stop(proc)
            raise AssertionError(f"{name} ({command}) did not finish in {timeout_s}s")
        return proc

    async def stop(self, proc: Proc, grace_s: float = TERM_GRACE_S) -> int:
        """SIGTERM, then SIGKILL after ``grace_s``; the exit code."""
        if proc.returncode is None:
            proc.signal(signal.SIGTERM)
            if await proc.wait(grace_s) is None:
                proc.signal(signal.SIGKILL)
        code = await proc.wait(5)
        assert code is not None, f"{proc.name} survived SIGKILL"
        # Leftover children of the group (there should be none) go too.
        proc.signal(signal.SIGKILL)
        return code

    async def close(self) -> None:
        running = [p for p in self.started if p.returncode is None]
        for proc in running:
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_S
        for proc in running:
            await proc.wait(max(deadline - time.monotonic(), 0.0))
        for proc in self.started:
            proc.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5)

    def report(self) -> str:
        parts = []
        for proc in self.started:
            parts.append(
                f"===== {proc.name} (pid {proc.pid}, exit {proc.returncode}): {proc.command}\n"
                + proc.output()[-20_000:]
            )
            if proc.out is not None:
                parts.append(f"----- {proc.name} stdout\n" + proc.stdout()[-5_000:])
        return "\n".join(parts)


# -- waiting ---------------------------------------------------------------------------


async def wait_http(url: str, proc: Proc | None = None, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll ``url`` until it answers 200 (bounded); fail early if ``proc`` has died."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.returncode is not None:
                raise AssertionError(f"{proc.name} exited with {proc.returncode} before ready")
            try:
                response = await client.get(url)
                if response.status_code == 200:
                    return
                last = response.status_code
            except httpx.HTTPError as exc:
                last = exc
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout_s}s (last: {last!r})")


async def wait_for(
    predicate: Callable[[], object], timeout_s: float, message: str, interval_s: float = 0.02
) -> None:
    """Poll a synchronous ``predicate`` until true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / interval_s) + 2):
        if predicate():
            return
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")


async def wait_output(proc: Proc, text: str, timeout_s: float = READY_TIMEOUT_S) -> str:
    """Wait until ``text`` appears in the process's output (bounded); the output so far."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = proc.output()
        if text in out:
            return out
        if proc.returncode is not None:
            raise AssertionError(f"{proc.name} exited with {proc.returncode}, no {text!r}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"{proc.name} did not print {text!r} within {timeout_s}s")


async def start_web(processes: Processes, env: dict[str, str], name: str = "web") -> str:
    """Start the Procfile's web line on a fresh $PORT; its base URL once it answers."""
    port = free_port()
    proc = processes.role("web", {**env, "PORT": str(port)}, name=name)
    base = f"http://127.0.0.1:{port}"
    await wait_http(base + "/", proc)
    return base


async def create_app(processes: Processes, env: dict[str, str]) -> str:
    """``ntorque create-app`` as an operator runs it; the new app's API key."""
    proc = await processes.run("create-app", "ntorque create-app --name acceptance", env)
    assert proc.returncode == 0, proc.output()
    return proc.stdout().strip()


async def start_role(processes: Processes, role: str, env: dict[str, str], name: str) -> Proc:
    """Start a worker or clock; ready once its metrics port answers (it opened its store)."""
    port = free_port()
    proc = processes.role(role, {**env, "NTORQUE_METRICS_PORT": str(port)}, name=name)
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"
    await wait_http(proc.metrics_url, proc)
    return proc


# -- the hook server -------------------------------------------------------------------


@dataclass
class Delivery:
    task_id: int
    retry_count: int
    path: str
    received: float
    finished: float | None = None


@dataclass
class HookServer:
    """A real HTTP hook on 127.0.0.1, in the test's event loop, recording every call.

    Paths: ``/ok`` 200; ``/fail`` 500; ``/status/<code>``; ``/slow/<ms>`` sleeps then 200;
    ``/jitter/<lo>/<hi>`` sleeps a random lo..hi ms then 200; ``/flaky/<n>`` answers 500 to
    attempts 0..n-1 (by ``NTORQUE-TASK-RETRY-COUNT``), then 200; ``/hang/<n>`` answers 500 to
    attempts 0..n-1, then takes 4 s to answer 200 (enqueue it with a shorter timeout).
    """

    port: int = field(default_factory=free_port)
    deliveries: list[Delivery] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        delivery = Delivery(
            task_id=int(request.headers.get("NTORQUE-TASK-ID", "0")),
            retry_count=int(request.headers.get("NTORQUE-TASK-RETRY-COUNT", "-1")),
            path=request.path,
            received=time.monotonic(),
        )
        self.deliveries.append(delivery)
        parts = request.path.strip("/").split("/")
        status = 200
        if parts[0] == "fail":
            status = 500
        elif parts[0] == "status":
            status = int(parts[1])
        elif parts[0] == "slow":
            await asyncio.sleep(int(parts[1]) / 1000)
        elif parts[0] == "flaky":
            await asyncio.sleep(random.uniform(0.005, 0.03))
            status = 500 if delivery.retry_count < int(parts[1]) else 200
        elif parts[0] == "hang":
            if delivery.retry_count < int(parts[1]):
                status = 500
            else:
                await asyncio.sleep(4)
        elif parts[0] == "jitter":
            await asyncio.sleep(random.uniform(int(parts[1]), int(parts[2])) / 1000)
        delivery.finished = time.monotonic()
        return web.Response(status=status, text="ok" if status < 300 else "no")

    def count(self, task_id: int) -> int:
        return sum(1 for d in self.deliveries if d.task_id == task_id)

    def per_task(self) -> Counter[int]:
        return Counter(d.task_id for d in self.deliveries)

    def attempts(self) -> Counter[tuple[int, int]]:
        return Counter((d.task_id, d.retry_count) for d in self.deliveries)


# -- API client helpers ----------------------------------------------------------------


class Api:
    """A small client for ntorque's HTTP API, as a user would drive it."""

    def __init__(self, base: str, key: str | None) -> None:
        self.base = base
        headers = {"NTORQUE-API-KEY": key} if key else {}
        self.client = httpx.AsyncClient(base_url=base, headers=headers, timeout=15)

    async def close(self) -> None:
        await self.client.aclose()

    async def enqueue(self, hook_url: str, body: bytes = b"{}", **params: Any) -> int:
        response = await self.client.post(
            "/",
            params={"url": hook_url, **params},
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 201, response.text
        task_id: int = response.json()["id"]
        assert response.headers["location"].endswith(f"/tasks/{task_id}")
        return task_id

    async def enqueue_many(self, hook_url: str, count: int, parallel: int = 20) -> list[int]:
        """Enqueue ``count`` tasks, ``parallel`` requests at a time; their ids in order."""
        semaphore = asyncio.Semaphore(parallel)

        async def one() -> int:
            async with semaphore:
                return await self.enqueue(hook_url)

        return list(await asyncio.gather(*(one() for _ in range(count))))

    async def task(self, task_id: int) -> dict[str, Any]:
        response = await self.client.get(f"/tasks/{task_id}")
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    async def wait_status(
        self, task_ids: list[int], status: str, timeout_s: float = 30
    ) -> dict[int, dict[str, Any]]:
        """Poll until every task has ``status`` (bounded); the tasks as last seen."""
        deadline = time.monotonic() + timeout_s
        seen: dict[int, dict[str, Any]] = {}
        remaining = list(task_ids)
        while remaining and time.monotonic() < deadline:
            for task_id in list(remaining):
                seen[task_id] = await self.task(task_id)
                if seen[task_id]["status"] == status:
                    remaining.remove(task_id)
            if remaining:
                await asyncio.sleep(0.1)
        assert not remaining, (
            f"{len(remaining)} tasks not {status} after {timeout_s}s, e.g. "
            f"{[seen.get(t) for t in remaining[:3]]}"
        )
        return seen


def metric_total(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


async def get_text(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
        assert response.status_code == 200, (url, response.status_code)
        return response.text


def unique_channel() -> str:
    return f"ntorque-accept-{uuid.uuid4().hex[:12]}"


def shell_quote(*args: str) -> str:
    return " ".join(shlex.quote(a) for a in args)


def procfile_env(tmp_path: Path, pg_url: str, channel: str, **extra: str) -> dict[str, str]:
    """What a Heroku dyno's environment holds: add-on URLs, our config vars, PATH."""
    from tests import support

    return base_env(
        tmp_path,
        DATABASE_URL=heroku_database_url(pg_url),
        REDIS_URL=support.REDIS_URL,
        NTORQUE_REDIS_CHANNEL=channel,
        **extra,
    )
