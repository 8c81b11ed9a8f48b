"""ntorque's benchmark: one command, every process on 127.0.0.1, a table of medians.

    .venv/bin/python -m bench            # the full run (about 10 minutes on 2 cores)
    .venv/bin/python -m bench --quick    # a smoke run of a few hundred tasks, no targets
    .venv/bin/python -m bench --scenarios A,B,raw --reps 5 --backlog 50000

It creates the database ``ntorque_bench_<pid>`` (dropped afterwards) and a Redis channel of
the same name, runs ``ntorque migrate``, ``ntorque web``, ``ntorque clock`` and
``ntorque worker`` as the Procfile does, a bare hook server (bench.hookserver) and a load
generator (bench.loadgen) in processes of their own, and prints medians (min-max) over
``--reps`` repetitions, with ntorque's figures as ratios to the machine's raw limits and
to the hand-written pipeline the targets are set against (bench.handwritten, scenario H:
its enqueue, drain and end-to-end rates, and its D latency measured beside each of ntorque's
D repetitions).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from redis import asyncio as aioredis

from bench import handwritten

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("raw", "clients", "A", "B", "C", "H", "D", "E", "F")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_json(argv: list[str]) -> Any:
    """Run ``python ARGV`` in a process of its own; its stdout is one JSON value."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        raise
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-500:])
    return json.loads(out)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its live descendants."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_s(int(child))
    return total


@dataclass
class Results:
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)
        print(f"    {name} = {value:,.2f}", flush=True)

    def median(self, name: str) -> float | None:
        got = self.values.get(name)
        return statistics.median(got) if got else None


class Bench:
    def __init__(
        self, args: argparse.Namespace, suffix: str = "", results: Results | None = None
    ) -> None:
        self.args = args
        self.name = f"ntorque_bench_{os.getpid()}{suffix}"
        # A second stack (E's history database) runs no hand-written pipeline of its own.
        self.with_hand = "H" in args.scenarios and not suffix
        self.admin_dsn = args.pg.rstrip("/") + "/postgres"
        self.dsn = args.pg.rstrip("/") + "/" + self.name
        self.raw_dsn = self.dsn.replace("+asyncpg", "")  # for asyncpg itself (bench.pgraw)
        self.logs = Path(tempfile.mkdtemp(prefix="ntorque-bench-"))
        self.web_port = free_port()
        self.hook_port = free_port()
        self.hook_url = f"http://127.0.0.1:{self.hook_port}/hook"
        self.web_url = f"http://127.0.0.1:{self.web_port}"
        # The hand-written pipeline (bench.handwritten): the yardstick of the targets.
        self.hand_url = f"http://127.0.0.1:{free_port()}"
        self.hand_channel = f"{self.name}:hand"
        self.exe = str(Path(sys.executable).parent / "ntorque")
        self.env = {
            k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "PORT")
        }
        self.env.update(
            DATABASE_URL=self.dsn,
            REDIS_URL=args.redis,
            NTORQUE_REDIS_CHANNEL=self.name,
            PORT=str(self.web_port),
            NTORQUE_LOG_LEVEL="warning",
            NTORQUE_BOOTSTRAP_APP="false",
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.results = results if results is not None else Results()
        self.key = ""
        self.db: asyncpg.Connection | None = None
        self.redis: aioredis.Redis | None = None
        self.http: aiohttp.ClientSession | None = None
        self.profilers: list[subprocess.Popen[bytes]] = []

    # -- processes ------------------------------------------------------------------

    def start(self, role: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{role}.log", "ab")  # noqa: SIM115 - lives with the process
        env = {**self.env, "BENCH_CHANNEL": self.hand_channel}
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=log)
        self.procs[role] = proc
        return proc

    def stop(self, role: str, timeout_s: float = 30) -> None:
        proc = self.procs.pop(role, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def check_alive(self) -> None:
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                log = (self.logs / f"{role}.log").read_text()[-3000:]
                raise SystemExit(f"bench: {role} exited with {proc.returncode}:\n{log}")

    async def wait_http(self, url: str, timeout_s: float = 30, ok: tuple[int, ...] = ()) -> None:
        assert self.http is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.http.get(url) as resp:
                    if resp.status == 200 or resp.status in ok:
                        return
            await asyncio.sleep(0.05)
        raise SystemExit(f"bench: {url} did not answer within {timeout_s}s")

    def ntorque(self, *argv: str) -> str:
        done = subprocess.run(
            [self.exe, *argv], env=self.env, cwd=ROOT, capture_output=True, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"bench: ntorque {' '.join(argv)} failed:\n{done.stderr.decode()}")
        return done.stdout.decode()

    async def start_worker(self) -> int:
        proc = self.start("worker", [self.exe, "worker"])
        # Warm up: one task through the whole path proves the worker is listening.
        await self.hook_reset()
        assert self.http is not None
        async with self.http.post(
            f"{self.web_url}/?url={self.hook_url}",
            data=b"{}",
            headers={"NTORQUE_API_KEY": self.key, "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 201, await resp.text()
        await self.wait_hook_unique(1, 30)
        await self.wait_no_pending(30)
        return proc.pid

    # -- set-up and tear-down -------------------------------------------------------

    async def setup(self) -> None:
        admin = await asyncpg.connect(self.admin_dsn)
        await admin.execute(f'CREATE DATABASE "{self.name}"')
        await admin.close()
        self.redis = aioredis.Redis.from_url(self.args.redis)
        await self.redis.delete(self.name)
        self.http = aiohttp.ClientSession()
        self.ntorque("migrate")
        self.key = self.ntorque("create-app", "--name", "bench").strip()
        self.db = await asyncpg.connect(self.dsn)
        # One process each, whatever WEB_CONCURRENCY says (uvicorn reads it): the hook
        # server counts arrivals in its own memory, and ntorque's web is the one to scale.
        self.start(
            "hook",
            [
                sys.executable, "-m", "uvicorn", "bench.hookserver:app",
                "--host", "127.0.0.1", "--port", str(self.hook_port),
                "--loop", "uvloop", "--http", "httptools", "--workers", "1",
                "--log-level", "warning", "--no-access-log",
            ],
        )  # fmt: skip
        self.start("web", [self.exe, "web", "--host", "127.0.0.1"])
        self.start("clock", [self.exe, "clock"])
        if self.with_hand:
            await self.db.execute(handwritten.SCHEMA)
            self.start(
                "hand-web",
                [
                    sys.executable, "-m", "uvicorn", "bench.handwritten:app",
                    "--host", "127.0.0.1", "--port", self.hand_url.rsplit(":", 1)[1],
                    "--loop", "uvloop", "--http", "httptools", "--workers", "1",
                    "--log-level", "warning", "--no-access-log",
                ],
            )  # fmt: skip
        await self.wait_http(f"http://127.0.0.1:{self.hook_port}/_bench/stats")
        await self.wait_http(self.web_url + "/")
        if "hand-web" in self.procs:
            await self.wait_http(self.hand_url + "/", ok=(405,))

    async def teardown(self) -> None:
        for proc in self.profilers:
            if proc.poll() is None:
                proc.kill()
        for role in list(self.procs):
            self.stop(role, 10)
        if self.http is not None:
            await self.http.close()
        if self.db is not None:
            await self.db.close()
        if self.redis is not None:
            await self.redis.delete(self.name, self.hand_channel)
            await self.redis.aclose()
        if not self.args.keep_db:
            admin = await asyncpg.connect(self.admin_dsn)
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            await admin.close()

    # -- helpers ----------------------------------------------------------------------

    async def hook(self, what: str) -> Any:
        assert self.http is not None
        async with self.http.get(f"http://127.0.0.1:{self.hook_port}/_bench/{what}") as resp:
            return await resp.json()

    async def hook_reset(self) -> None:
        await self.hook("reset")

    async def wait_hook_unique(self, n: int, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stats: dict[str, Any] = await self.hook("stats")
            if stats["unique"] >= n:
                return stats
            self.check_alive()
            await asyncio.sleep(0.05)
        raise SystemExit(f"bench: only {stats['unique']} of {n} tasks reached the hook")

    async def wait_no_pending(
        self, timeout_s: float, min_id: int = 0, table: str = "tasks"
    ) -> float:
        """Wait until no task from ``min_id`` on is pending; their last ``modified``."""
        assert self.db is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            row = await self.db.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'PENDING') AS pending,"
                f" max(modified) AS last FROM {table} WHERE id >= $1",
                min_id,
            )
            assert row is not None
            if row["pending"] == 0:
                return float(row["last"] or 0.0)
            self.check_alive()
            await asyncio.sleep(0.05)
        raise SystemExit(f"bench: tasks still pending after {timeout_s}s")

    async def loadgen(
        self, n: int, *, rate: float | None = None, raw: bool = False, hand: bool = False
    ) -> Any:
        out = self.logs / "loadgen.json"
        argv = [sys.executable, "-m", "bench.loadgen", "--n", str(n), "--out", str(out)]
        if raw:
            argv += ["--target", f"http://127.0.0.1:{self.hook_port}/"]
        else:
            web = self.hand_url if hand else self.web_url
            argv += ["--target", web, "--hook", self.hook_url, "--key", self.key]
        if rate:
            argv += ["--rate", str(rate)]
        proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT)
        try:
            code = await proc.wait()
        except asyncio.CancelledError:
            proc.kill()
            raise
        if code != 0:
            raise SystemExit("bench: the load generator failed")
        result = json.loads(out.read_text())
        if result["errors"]:
            raise SystemExit(f"bench: {result['errors']} requests failed: {result['first_errors']}")
        return result

    async def clear_channel(self) -> None:
        assert self.redis is not None
        await self.redis.delete(self.name, self.hand_channel)

    @contextlib.contextmanager
    def profiling(self, label: str, roles: tuple[str, ...] = ("web", "worker")) -> Iterator[None]:
        """py-spy on ``roles`` (web and worker) while the block runs (``--profile DIR``)."""
        if not self.args.profile:
            yield
            return
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        started = []
        for role in roles:
            proc = self.procs.get(role)
            if proc is None:
                continue
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid),
                    "--rate", "200", "--format", "raw", "--subprocesses", "--nonblocking",
                    "--output", str(out / f"{label}-{role}.txt"),
                ],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            started.append(spy)
            self.profilers.append(spy)
        time.sleep(0.5)
        try:
            yield
        finally:
            for spy in started:
                spy.send_signal(signal.SIGINT)
            for spy in started:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(20)

    # -- scenarios --------------------------------------------------------------------

    async def raw_limits(self) -> None:
        a = self.args
        print("raw limits", flush=True)
        for _ in range(a.reps):
            result = await self.loadgen(a.raw_requests, raw=True)
            self.results.add("raw_loadgen_bare", result["rate"])
        for _ in range(a.reps):
            self.results.add("raw_aiohttp_hook", await self.client_rate("aiohttp"))
        for _ in range(a.reps):
            argv = ["-m", "bench.pgraw", "--dsn", self.raw_dsn, "--seconds", str(a.raw_seconds)]
            self.results.add("raw_asyncpg_insert", (await run_json(argv))["rate"])

    async def client_rate(self, client: str) -> float:
        url = self.hook_url.replace("/hook", "/")
        argv = ["-m", "bench.clients", "--client", client, "--url", url]
        try:
            return float((await run_json([*argv, "--n", str(self.args.client_requests)]))["rate"])
        except RuntimeError as exc:
            print(f"    {client}: failed: {exc}")
            return float("nan")

    async def clients(self) -> None:
        print("hook clients (32 concurrent POSTs against the hook server)", flush=True)
        for _ in range(self.args.reps):
            for client in ("aiohttp", "httpx", "httpx-aiohttp"):
                self.results.add(f"client_{client}", await self.client_rate(client))

    async def enqueue_then_drain(self, prefix: str, drain: bool, reps: int | None = None) -> None:
        """A (and B): enqueue a backlog with workers stopped, then drain it."""
        a = self.args
        for rep in range(a.reps if reps is None else reps):
            print(f"{prefix}: repetition {rep + 1}", flush=True)
            self.stop("worker")
            await self.wait_no_pending(60)
            await self.clear_channel()
            web_cpu = cpu_s(self.procs["web"].pid)
            with self.profiling(f"{prefix}-enqueue"):
                result = await self.loadgen(a.backlog)
            web_cpu = cpu_s(self.procs["web"].pid) - web_cpu
            self.results.add(f"{prefix}_enqueue_rate", result["rate"])
            self.results.add(f"{prefix}_web_cpu_us", web_cpu / a.backlog * 1e6)
            self.results.add(f"{prefix}_enqueue_p50_ms", result["p50_ms"])
            self.results.add(f"{prefix}_enqueue_p99_ms", result["p99_ms"])
            # The next repetition starts from an empty queue: drain even when B is not asked
            # for, and record the drain only when it is.
            await self.hook_reset()
            worker = self.start("worker", [self.exe, "worker"])
            # CPU from the first delivery on: start-up (imports, migration check) is not work.
            first = await self.wait_hook_unique(1, 60)
            cpu = cpu_s(worker.pid)
            with self.profiling(f"{prefix}-drain"):
                stats = await self.wait_hook_unique(a.backlog, a.timeout)
            await self.wait_no_pending(60)
            cpu = cpu_s(worker.pid) - cpu
            if drain:
                rate = a.backlog / (stats["last"] - stats["first"])
                self.results.add(f"{prefix}_drain_rate", rate)
                # A small backlog (--quick) may be gone by the first look: nothing measured.
                measured = a.backlog - first["unique"]
                if measured > 0:
                    self.results.add(f"{prefix}_worker_cpu_us", cpu / measured * 1e6)
        self.stop("worker")
        await self.clear_channel()

    async def end_to_end(self) -> None:
        a = self.args
        await self.start_worker()
        for rep in range(a.reps):
            print(f"C: repetition {rep + 1}", flush=True)
            await self.hook_reset()
            web, worker = self.procs["web"].pid, self.procs["worker"].pid
            cpu = cpu_s(web), cpu_s(worker)
            with self.profiling("C"):
                result = await self.loadgen(a.tasks)
                first_id = min(i for i, _ in result["sent"])
                last = await self.wait_no_pending(a.timeout, first_id)
            self.results.add("C_web_cpu_us", (cpu_s(web) - cpu[0]) / a.tasks * 1e6)
            self.results.add("C_worker_cpu_us", (cpu_s(worker) - cpu[1]) / a.tasks * 1e6)
            # From the load generator's first request to the last outcome's commit.
            self.results.add("C_end_to_end_rate", a.tasks / (last - result["started_wall"]))

    async def latency(self) -> None:
        a = self.args
        if os.environ.get("BENCH_FRESH_D"):
            self.stop("worker")
        if "worker" not in self.procs:
            await self.start_worker()
        hand = "H" in a.scenarios
        if hand and "hand-worker" not in self.procs:
            await self.start_hand_worker()
        n = int(a.rate * a.rate_seconds)
        for rep in range(a.reps):
            print(f"D: repetition {rep + 1}", flush=True)
            # Side by side: the hand-written pipeline's run follows each of ntorque's, so
            # both see the machine in the same state (D moves by 30 % between runs).
            for prefix in ("D", "H_D") if hand else ("D",):
                await self.hook_reset()
                # CPU per task at a steady low rate: every wake-up on a cold CPU (README).
                roles = ("web", "worker") if prefix == "D" else ("hand-web", "hand-worker")
                cpu = {role: cpu_s(self.procs[role].pid) for role in roles}
                with self.profiling(prefix, roles):
                    result = await self.loadgen(n, rate=a.rate, hand=prefix != "D")
                await self.wait_hook_unique(n, a.timeout)
                for role, (name, before) in zip(("web", "worker"), cpu.items(), strict=True):
                    used = cpu_s(self.procs[name].pid) - before
                    self.results.add(f"{prefix}_{role}_cpu_us", used / n * 1e6)
                arrived: dict[int, float] = {}
                for t, task_id in await self.hook("arrivals"):
                    arrived.setdefault(task_id, t)
                lat = [arrived[i] - t0 for i, t0 in result["sent"]]
                self.results.add(f"{prefix}_hook_p50_ms", percentile(lat, 0.5) * 1000)
                self.results.add(f"{prefix}_hook_p99_ms", percentile(lat, 0.99) * 1000)
                self.results.add(f"{prefix}_enqueue_p50_ms", result["p50_ms"])
            # The disk under both: a lone INSERT+COMMIT at the same rate, in the same minute.
            argv = ["-m", "bench.pgraw", "--dsn", self.raw_dsn, "--rate", str(a.rate)]
            floor = await run_json([*argv, "--seconds", str(a.rate_seconds)])
            for name in ("p50_ms", "p99_ms", "max_ms", "over_10ms"):
                self.results.add(f"D_commit_{name}", floor[name])
        self.stop("worker")
        self.stop("hand-worker")

    async def start_hand_worker(self, warm: bool = True) -> None:
        self.start("hand-worker", [sys.executable, "-m", "bench.handwritten", "worker"])
        if not warm:
            return
        # Warm up as start_worker does: one task through the whole path.
        await self.hook_reset()
        assert self.http is not None
        async with self.http.post(f"{self.hand_url}/?url={self.hook_url}", data=b"{}") as resp:
            assert resp.status == 201, await resp.text()
        await self.wait_hook_unique(1, 30)
        await self.wait_no_pending(30, table="hand_tasks")

    async def handwritten(self) -> None:
        """H: A, B and C of the hand-written pipeline (its D runs beside ntorque's D)."""
        a = self.args
        for rep in range(a.reps):
            print(f"H: repetition {rep + 1}", flush=True)
            self.stop("hand-worker")
            await self.clear_channel()
            result = await self.loadgen(a.backlog, hand=True)
            self.results.add("H_enqueue_rate", result["rate"])
            self.results.add("H_enqueue_p99_ms", result["p99_ms"])
            await self.hook_reset()
            await self.start_hand_worker(warm=False)
            stats = await self.wait_hook_unique(a.backlog, a.timeout)
            await self.wait_no_pending(60, table="hand_tasks")
            self.results.add("H_drain_rate", a.backlog / (stats["last"] - stats["first"]))
            result = await self.loadgen(a.tasks, hand=True)
            first_id = min(i for i, _ in result["sent"])
            last = await self.wait_no_pending(a.timeout, first_id, table="hand_tasks")
            self.results.add("H_end_to_end_rate", a.tasks / (last - result["started_wall"]))
        self.stop("hand-worker")
        await self.clear_channel()

    async def history(self) -> None:
        """E: A and B on a second stack whose table holds the history, beside A and B here.

        The machine's speed drifts by 20-40 % over minutes, so E's repetitions alternate
        with those of an empty table (this stack's, truncated) instead of being compared
        with A's, measured minutes earlier.
        """
        assert self.db is not None
        hist = Bench(self.args, suffix="_e", results=self.results)
        try:
            await hist.setup()
            await hist.load_history(self.args.history)
            # Its processes are new: warm them up as this stack's are by now.
            await hist.start_worker()
            warm = await hist.loadgen(min(self.args.backlog, 2000))
            await hist.wait_no_pending(self.args.timeout, min(i for i, _ in warm["sent"]))
            self.stop("worker")
            await self.db.execute("TRUNCATE tasks")
            for rep in range(self.args.reps):
                print(f"E: repetition {rep + 1} (empty table, then history)", flush=True)
                await self.enqueue_then_drain("EA", drain=True, reps=1)
                await hist.enqueue_then_drain("E", drain=True, reps=1)
        finally:
            await asyncio.shield(hist.teardown())

    async def load_history(self, n: int) -> None:
        assert self.db is not None
        print(f"E: inserting {n:,} finished tasks", flush=True)
        started = time.monotonic()
        app_id = await self.db.fetchval("SELECT min(id) FROM applications")
        await self.db.execute(
            """
            INSERT INTO tasks (app_id, url, method, timeout, body, content_type, headers,
                               status, retry_count, due, created, modified, last_status)
            SELECT $1, $2, 'POST', 60, '\\x7b7d'::bytea, 'application/json', '[]',
                   'COMPLETED', 1, t, t, t, 200
            FROM (SELECT extract(epoch FROM now()) - g * 0.001 AS t
                  FROM generate_series(1, $3) AS g) AS s
            """,
            app_id,
            self.hook_url,
            n,
        )
        await self.db.execute("VACUUM ANALYZE tasks")
        # History is old in real life: do not measure the bulk load's own checkpoint.
        await self.db.execute("CHECKPOINT")
        print(f"    inserted in {time.monotonic() - started:.1f}s", flush=True)

    async def memory(self) -> None:
        a = self.args
        self.stop("worker")
        pid = await self.start_worker()
        print(f"F: warm-up {a.mem_warmup} tasks", flush=True)
        result = await self.loadgen(a.mem_warmup)
        await self.wait_no_pending(a.timeout, min(i for i, _ in result["sent"]))
        before = rss_mb(pid)
        print(f"F: {a.mem_tasks:,} tasks through the worker", flush=True)
        result = await self.loadgen(a.mem_tasks)
        await self.wait_no_pending(a.timeout * 5, min(i for i, _ in result["sent"]))
        await asyncio.sleep(1)
        after = rss_mb(pid)
        self.results.add("F_rss_before_mb", before)
        self.results.add("F_rss_after_mb", after)
        self.results.add("F_rss_growth_mb", after - before)
        self.stop("worker")

    async def run(self) -> None:
        chosen = self.args.scenarios
        # Ctrl-C or SIGTERM: cancel the scenarios so that teardown stops every process
        # and drops the database.
        loop = asyncio.get_running_loop()
        current = asyncio.current_task()
        assert current is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, current.cancel)
        try:
            await self.setup()
            if "raw" in chosen:
                await self.raw_limits()
            if "clients" in chosen:
                await self.clients()
            if "A" in chosen or "B" in chosen:
                await self.enqueue_then_drain("A", drain="B" in chosen)
            if "C" in chosen:
                await self.end_to_end()
            if "H" in chosen:
                await self.handwritten()
            if "D" in chosen:
                await self.latency()
            self.stop("worker")
            if "F" in chosen:
                await self.memory()
            if "E" in chosen:
                await self.history()
        except asyncio.CancelledError:
            print("bench: interrupted; cleaning up", flush=True)
            raise
        finally:
            await asyncio.shield(self.teardown())


# -- the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    label: str
    key: str
    unit: str
    target: str = ""
    ok: Callable[[float], bool] | None = None


ROWS = [
    Row("raw: load generator -> bare ASGI app", "raw_loadgen_bare", "req/s"),
    Row("raw: aiohttp client -> hook server", "raw_aiohttp_hook", "req/s"),
    Row("raw: asyncpg INSERT+COMMIT, 32 conns", "raw_asyncpg_insert", "rows/s"),
    Row("hook client: aiohttp", "client_aiohttp", "req/s"),
    Row("hook client: httpx AsyncClient", "client_httpx", "req/s"),
    Row("hook client: httpx + aiohttp transport", "client_httpx-aiohttp", "req/s"),
    Row("A enqueue, workers stopped", "A_enqueue_rate", "tasks/s", ">= 5000", lambda v: v >= 5000),
    Row("A enqueue latency p50", "A_enqueue_p50_ms", "ms"),
    Row("A enqueue latency p99", "A_enqueue_p99_ms", "ms"),
    Row("A web CPU per task", "A_web_cpu_us", "us"),
    Row("B drain of the backlog", "A_drain_rate", "tasks/s", ">= 4000", lambda v: v >= 4000),
    Row("B worker CPU per task", "A_worker_cpu_us", "us"),
    Row("C end to end", "C_end_to_end_rate", "tasks/s", ">= 2500", lambda v: v >= 2500),
    Row("C web CPU per task", "C_web_cpu_us", "us"),
    Row("C worker CPU per task", "C_worker_cpu_us", "us"),
    Row("D enqueue->hook p50, steady rate", "D_hook_p50_ms", "ms", "<= 2", lambda v: v <= 2),
    Row("D enqueue->hook p99, steady rate", "D_hook_p99_ms", "ms", "<= 5", lambda v: v <= 5),
    Row("D enqueue latency p50, steady rate", "D_enqueue_p50_ms", "ms"),
    Row("D web CPU per task, steady rate", "D_web_cpu_us", "us"),
    Row("D worker CPU per task, steady rate", "D_worker_cpu_us", "us"),
    Row("D floor: lone INSERT+COMMIT at the same rate, p50", "D_commit_p50_ms", "ms"),
    Row("D floor: lone INSERT+COMMIT at the same rate, p99", "D_commit_p99_ms", "ms"),
    Row("D floor: lone INSERT+COMMIT at the same rate, max", "D_commit_max_ms", "ms"),
    Row("D floor: commits over 10 ms", "D_commit_over_10ms", "count"),
    Row("H hand-written: enqueue", "H_enqueue_rate", "tasks/s"),
    Row("H hand-written: enqueue latency p99", "H_enqueue_p99_ms", "ms"),
    Row("H hand-written: drain of the backlog", "H_drain_rate", "tasks/s"),
    Row("H hand-written: end to end", "H_end_to_end_rate", "tasks/s"),
    Row("H hand-written: enqueue->hook p50", "H_D_hook_p50_ms", "ms"),
    Row("H hand-written: enqueue->hook p99", "H_D_hook_p99_ms", "ms"),
    Row("H hand-written: web CPU per task, steady rate", "H_D_web_cpu_us", "us"),
    Row("H hand-written: worker CPU per task, steady rate", "H_D_worker_cpu_us", "us"),
    Row("E enqueue, empty table (beside E)", "EA_enqueue_rate", "tasks/s"),
    Row("E enqueue, finished history in table", "E_enqueue_rate", "tasks/s"),
    Row("E enqueue latency p99", "E_enqueue_p99_ms", "ms"),
    Row("E drain, empty table (beside E)", "EA_drain_rate", "tasks/s"),
    Row("E drain, finished history in table", "E_drain_rate", "tasks/s"),
    Row("F worker RSS before", "F_rss_before_mb", "MB"),
    Row("F worker RSS after", "F_rss_after_mb", "MB"),
    Row("F worker RSS growth", "F_rss_growth_mb", "MB", "<= 20", lambda v: v <= 20),
]

# ntorque's figure over the machine's raw limit it is bounded by.
RATIOS = [
    ("A enqueue / load generator -> bare ASGI", "A_enqueue_rate", "raw_loadgen_bare"),
    ("A enqueue / asyncpg INSERT+COMMIT", "A_enqueue_rate", "raw_asyncpg_insert"),
    ("B drain / aiohttp -> hook server", "A_drain_rate", "raw_aiohttp_hook"),
    ("C end to end / aiohttp -> hook server", "C_end_to_end_rate", "raw_aiohttp_hook"),
    # The targets over its hand-written figures (2,400 / 1,600 / 1,200 tasks/s,
    # 2.3 / 6.4 ms): 5,000 / 4,000 / 2,500 tasks/s and 2 / 5 ms as ratios.
    ("A enqueue / hand-written (target >= 2.08)", "A_enqueue_rate", "H_enqueue_rate"),
    ("B drain / hand-written (target >= 2.50)", "A_drain_rate", "H_drain_rate"),
    ("C end to end / hand-written (target >= 2.08)", "C_end_to_end_rate", "H_end_to_end_rate"),
    ("D p50 / hand-written (target <= 0.87)", "D_hook_p50_ms", "H_D_hook_p50_ms"),
    ("D p99 / hand-written (target <= 0.78)", "D_hook_p99_ms", "H_D_hook_p99_ms"),
    ("E enqueue / empty table beside it (target >= 0.90)", "E_enqueue_rate", "EA_enqueue_rate"),
    ("E drain / empty table beside it (target >= 0.90)", "E_drain_rate", "EA_drain_rate"),
]


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def table(results: Results, targets: bool) -> str:
    lines = [
        f"| measure | unit | median | min-max | n |{' target |' if targets else ''}",
        f"|---|---|---:|---:|---:|{'---|' if targets else ''}",
    ]
    for row in ROWS:
        got = results.values.get(row.key)
        if not got:
            continue
        med = statistics.median(got)
        cell = f"| {row.label} | {row.unit} | {fmt(med)} | {fmt(min(got))}-{fmt(max(got))}"
        cell += f" | {len(got)} |"
        if targets:
            mark = ""
            if row.ok is not None:
                mark = f"{row.target} {'ok' if row.ok(med) else 'MISSED'}"
            cell += f" {mark} |"
        lines.append(cell)
    ratio_lines = []
    for label, top, bottom in RATIOS:
        t, b = results.median(top), results.median(bottom)
        if t is not None and b:
            ratio_lines.append(f"| {label} | {t / b:.2f} |")
    if ratio_lines:
        lines += ["", "| ratio (medians) | value |", "|---|---:|", *ratio_lines]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: a few hundred tasks")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="e.g. raw,A,B,C,H,D")
    p.add_argument("--reps", type=int, help="repetitions per measure (default 3; quick 1)")
    p.add_argument("--backlog", type=int, help="A/B/E backlog size (default 20000)")
    p.add_argument("--tasks", type=int, help="C tasks (default 20000)")
    p.add_argument("--rate", type=float, default=200.0, help="D steady rate, tasks/s")
    p.add_argument("--rate-seconds", type=float, help="D duration (default 10)")
    p.add_argument("--history", type=int, help="E finished tasks (default 1000000)")
    p.add_argument("--mem-tasks", type=int, help="F tasks (default 100000)")
    p.add_argument("--mem-warmup", type=int, help="F warm-up tasks (default 2000)")
    p.add_argument("--raw-requests", type=int, help="raw load generator requests (default 20000)")
    p.add_argument("--raw-seconds", type=float, help="asyncpg ceiling duration (default 3)")
    p.add_argument("--client-requests", type=int, help="per hook client (default 10000)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait per step")
    p.add_argument(
        "--pg", default=os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
    )
    p.add_argument("--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"))
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy web and worker during A, B, C and D (D: the hand-written pair's too)",
    )
    p.add_argument("--json", metavar="FILE", help="also write every measured value here")
    p.add_argument("--keep-db", action="store_true", help="keep the database for inspection")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "reps": (1, 3),
        "backlog": (300, 20_000),
        "tasks": (300, 20_000),
        "rate_seconds": (1.5, 10.0),
        "history": (20_000, 1_000_000),
        "mem_tasks": (300, 100_000),
        "mem_warmup": (50, 2_000),
        "raw_requests": (1_000, 20_000),
        "raw_seconds": (1.0, 3.0),
        "client_requests": (500, 10_000),
    }
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {','.join(SCENARIOS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    bench = Bench(args)
    started = time.monotonic()
    print(f"bench: database {bench.name}, logs in {bench.logs}", flush=True)
    try:
        asyncio.run(bench.run())
    except asyncio.CancelledError:
        raise SystemExit(130) from None
    print(f"\nbench: finished in {time.monotonic() - started:.0f}s "
          f"({os.cpu_count()} cores, {args.reps} repetitions; backlog {args.backlog:,}, "
          f"C {args.tasks:,} tasks, D {args.rate:g}/s for {args.rate_seconds:g}s, "
          f"E history {args.history:,}, F {args.mem_tasks:,} tasks)\n")  # fmt: skip
    print(table(bench.results, targets=not args.quick))
    if args.json:
        Path(args.json).write_text(json.dumps(bench.results.values, indent=1))
