"""After a workload of successes, failures and retries, every process's metrics say so.

The processes are real subprocesses (the Procfile's lines; ``ntorque run`` for the embedded
default), so each starts from zero and counts can be compared exactly.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import redis

from ntorque import metrics
from tests import support
from tests.support import HookServer

from .conftest import (
    PUBLISH_INTERVAL_S,
    VENV_BIN,
    Cluster,
    Exposition,
    _env,
    scrape,
    start,
    stop_all,
)
from .workload import Sent, send, settle

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

WEB_FAMILIES = {
    "ntorque_tasks_enqueued",
    "ntorque_enqueue_duration_seconds",
    "ntorque_enqueue_rejected",
    "ntorque_api_errors",
}
# The error answers test_procfile_processes_export_what_happened provokes, by (status, code):
# the workload's bad URL, then a missing key, an unknown task, a wrong method and a request
# the HTTP layer refuses before the app sees it. None was a 503: its series is there at 0.
API_ERRORS = {
    ("400", "bad_url"): 1,
    ("401", "unauthorized"): 1,
    ("404", "not_found"): 1,
    ("405", "method_not_allowed"): 1,
    ("400", "bad_request"): 1,
    ("503", "unavailable"): 0,
}
WORKER_FAMILIES = {
    "ntorque_tasks_acquired",
    "ntorque_acquire_misses",
    "ntorque_acquire_duration_seconds",
    "ntorque_hook_duration_seconds",
    "ntorque_attempts",
    "ntorque_retries",
    "ntorque_tasks_completed",
    "ntorque_tasks_failed",
    "ntorque_task_duration_seconds",
    "ntorque_hooks_in_flight",
}
CLOCK_FAMILIES = {"ntorque_due_tasks", "ntorque_oldest_due_age_seconds", "ntorque_requeued"}
PROCESS_FAMILIES = {"process_resident_memory_bytes", "process_cpu_seconds"}


def web_mismatches(expo: Exposition, sent: Sent, app: str) -> list[str]:
    total = len(sent.ids)
    checks = {
        "enqueued": (expo.value("ntorque_tasks_enqueued_total", app=app), total),
        "enqueue latency count": (expo.value("ntorque_enqueue_duration_seconds_count"), total),
        "rejected": (expo.value("ntorque_enqueue_rejected_total"), sent.rejected),
    }
    return [f"{k}: {got} != {want}" for k, (got, want) in checks.items() if got != want]


def api_error_mismatches(expo: Exposition) -> list[str]:
    return [
        f"api errors {status} {code}: {got} != {want}"
        for (status, code), want in API_ERRORS.items()
        if (got := expo.value("ntorque_api_errors_total", status=status, code=code)) != want
    ]


async def provoke_error_answers(web: str) -> None:
    """The answers of API_ERRORS after the workload's bad URL, each checked as it comes."""
    async with httpx.AsyncClient(base_url=web, timeout=10) as anonymous:
        assert (await anonymous.post("/", params={"url": "http://127.0.0.1:9/"})).status_code == 401
    async with httpx.AsyncClient(base_url=web, timeout=10) as client:
        assert (await client.get("/metrics/nothing")).status_code == 404
        assert (await client.delete("/")).status_code == 405
    host, port = web.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
    finally:
        writer.close()


def worker_mismatches(expo: Exposition, sent: Sent) -> list[str]:
    completed = len(sent.ok) + len(sent.retried)
    hook = "ntorque_hook_duration_seconds_count"
    checks = {
        "acquired": (expo.value("ntorque_tasks_acquired_total"), sent.attempts),
        "attempts completed": (
            expo.value("ntorque_attempts_total", outcome="completed"),
            completed,
        ),
        "attempts failed": (
            expo.value("ntorque_attempts_total", outcome="failed"),
            len(sent.failed),
        ),
        "attempts retry": (
            expo.value("ntorque_attempts_total", outcome="retry"),
            len(sent.retried),
        ),
        "retries": (expo.value("ntorque_retries_total"), len(sent.retried)),
        "tasks completed": (expo.value("ntorque_tasks_completed_total"), completed),
        "tasks failed": (expo.value("ntorque_tasks_failed_total"), len(sent.failed)),
        "hook 2xx completed": (
            expo.value(hook, outcome="completed", status_class="2xx"),
            completed,
        ),
        "hook 4xx failed": (
            expo.value(hook, outcome="failed", status_class="4xx"),
            len(sent.failed),
        ),
        "hook 5xx retry": (
            expo.value(hook, outcome="retry", status_class="5xx"),
            len(sent.retried),
        ),
        "hook calls": (expo.value(hook), sent.attempts),
        "e2e completed": (
            expo.value("ntorque_task_duration_seconds_count", status="completed"),
            completed,
        ),
        "e2e failed": (
            expo.value("ntorque_task_duration_seconds_count", status="failed"),
            len(sent.failed),
        ),
        "in flight": (expo.value("ntorque_hooks_in_flight"), 0),
        "stale": (expo.value("ntorque_stale_outcomes_total"), 0),
    }
    wrong = [f"{k}: {got} != {want}" for k, (got, want) in checks.items() if got != want]
    # Every acquire statement is timed, and at least one took each attempt.
    if not expo.value("ntorque_acquire_duration_seconds_count") >= 1:
        wrong.append("acquire latency never observed")
    if math.isnan(expo.value("ntorque_acquire_misses_total")):
        wrong.append("acquire misses missing")
    return wrong


def clock_mismatches(expo: Exposition) -> list[str]:
    checks = {
        "due": (expo.value("ntorque_due_tasks"), 0),
        "oldest due age": (expo.value("ntorque_oldest_due_age_seconds"), 0),
        "exhausted": (expo.value("ntorque_exhausted_total"), 0),
    }
    wrong = [f"{k}: {got} != {want}" for k, (got, want) in checks.items() if got != want]
    if math.isnan(expo.value("ntorque_requeued_total")):
        wrong.append("requeued missing")
    return wrong


async def eventually(
    read: Callable[[], Awaitable[Exposition]],
    mismatches: Callable[[Exposition], list[str]],
    timeout_s: float = 20,
) -> Exposition:
    """Scrape until the metrics match (outcomes are recorded just after the hook answers)."""
    deadline = time.monotonic() + timeout_s
    wrong: list[str] = []
    for _ in range(int(timeout_s / 0.1) + 1):
        expo = await read()
        wrong = mismatches(expo)
        if not wrong:
            return expo
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    raise AssertionError(f"metrics still wrong after {timeout_s}s: {wrong}")


async def test_procfile_processes_export_what_happened(
    cluster: Cluster, hook_server: HookServer
) -> None:
    # Given the Procfile's web (2 uvicorn workers), worker and clock on PostgreSQL + Redis,
    headers = {"NTORQUE_API_KEY": cluster.key}
    async with (
        httpx.AsyncClient(base_url=cluster.web, headers=headers, timeout=10) as api,
        httpx.AsyncClient(timeout=10) as client,
    ):
        # when tasks succeed, fail and are retried,
        sent = await send(api, hook_server, ok=6, failed=3, retried=4)
        tasks = await settle(api, sent.ids)
        assert {tasks[i]["status"] for i in sent.failed} == {"FAILED"}
        assert {tasks[i]["retry_count"] for i in sent.retried} == {2}
        assert hook_server.count() == sent.attempts
        # and requests are answered with errors,
        await provoke_error_answers(cluster.web)

        # then web's /metrics counts every task and every error answer, whichever uvicorn
        # worker took it,
        web = await eventually(
            lambda: scrape(client, cluster.web + "/metrics"),
            lambda e: web_mismatches(e, sent, "obs") + api_error_mismatches(e),
        )
        assert set(web.families) >= WEB_FAMILIES | PROCESS_FAMILIES
        # (multiprocess mode: one process_* series per uvicorn worker)
        assert len({ls["pid"] for ls in web.labelsets("process_resident_memory_bytes")}) == 2
        assert web.value("ntorque_process_info", role="web") == 1
        # and exports nothing it does not own: no backlog claimed by a web process.
        assert not (WORKER_FAMILIES | CLOCK_FAMILIES) & set(web.families)

        # the worker's metrics port counts every attempt by outcome,
        worker = await eventually(
            lambda: scrape(client, cluster.worker_metrics), lambda e: worker_mismatches(e, sent)
        )
        assert set(worker.families) >= WORKER_FAMILIES | PROCESS_FAMILIES
        assert worker.value("ntorque_process_info", role="worker") == 1

        # the clock's sees the backlog drained,
        clock = await eventually(lambda: scrape(client, cluster.clock_metrics), clock_mismatches)
        assert set(clock.families) >= CLOCK_FAMILIES | PROCESS_FAMILIES
        assert clock.value("ntorque_notify_failures_total", role="clock") == 0

        # and the Heroku route serves all three, per dyno, with the same numbers.
        def cluster_mismatches(e: Exposition) -> list[str]:
            dynos = {ls.get("dyno") for ls in e.labelsets("ntorque_process_info")}
            wrong = [] if dynos == {"web.1", "worker.1", "clock.1"} else [f"dynos {dynos}"]
            return (
                wrong
                + web_mismatches(e, sent, "obs")
                + api_error_mismatches(e)
                + worker_mismatches(e, sent)
                + clock_mismatches(e)
            )

        both = await eventually(
            lambda: scrape(client, cluster.web + "/metrics/cluster"), cluster_mismatches
        )
        for name, labels, _ in both.samples:
            assert "dyno" in labels, name
        assert both.labelsets("ntorque_due_tasks") == [{"dyno": "clock.1"}]
        assert both.value("process_resident_memory_bytes", dyno="worker.1") > 0

    # The published entries expire on their own (nothing grows if a dyno dies) ...
    r = redis.Redis(host=support.REDIS_HOST, port=support.REDIS_PORT)
    try:
        index = cluster.channel + ":metrics"
        keys = [k.decode() for k in r.scan_iter(match=f"{index}:*")]
        assert sorted(keys) == sorted(f"{index}:{d}" for d in ("web.1", "worker.1", "clock.1"))
        for key in [*keys, index]:
            assert 0 < r.pttl(key) <= (3 * PUBLISH_INTERVAL_S + 1) * 1000
        # ... and a clean stop withdraws them at once.
        stop_all(cluster.procs)
        assert [k for k in r.scan_iter(match=f"{index}*")] == []
    finally:
        r.close()


async def test_embedded_run_exports_every_role(tmp_path: Path, hook_server: HookServer) -> None:
    # Given `ntorque run` on the embedded default (SQLite, no Redis),
    port = support.free_port()
    env = _env(
        tmp_path,
        PORT=str(port),
        NTORQUE_SQLITE_PATH=str(tmp_path / "run.sqlite3"),
        NTORQUE_AUTHENTICATE="false",
    )
    procs = {"run": start([str(VENV_BIN / "ntorque"), "run"], env, tmp_path, tmp_path / "run.log")}
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as api:
            await support.wait_until(lambda: _answers(base), 30, 0.1)
            # when tasks succeed, fail and are retried,
            sent = await send(api, hook_server, ok=3, failed=2, retried=2)
            await settle(api, sent.ids)
            # then its one /metrics carries every role's metrics, matching what happened,
            expo = await eventually(
                lambda: scrape(api, "/metrics"),
                lambda e: web_mismatches(e, sent, "-") + worker_mismatches(e, sent),
            )
            assert set(expo.families) >= WEB_FAMILIES | WORKER_FAMILIES | CLOCK_FAMILIES
            assert expo.value("ntorque_process_info", role="run") == 1
            # and /metrics/cluster (no Redis) answers for this process alone.
            alone = await scrape(api, "/metrics/cluster")
            assert len({ls["dyno"] for ls in alone.labelsets("ntorque_process_info")}) == 1
            assert alone.value("ntorque_tasks_enqueued_total") == len(sent.ids)
    finally:
        stop_all(procs)
    assert procs["run"].returncode == 0, (tmp_path / "run.log").read_text()


async def _answers(base: str) -> bool:
    async with httpx.AsyncClient(timeout=2) as client:
        try:
            return (await client.get(base + "/")).status_code == 200
        except httpx.HTTPError:
            return False


def test_labels_are_bounded() -> None:
    # No metric may take a task id or URL as a label: only these bounded names.
    allowed = {"app", "reason", "outcome", "status_class", "status", "role", "version"}
    for collector in (
        metrics.TASKS_ENQUEUED,
        metrics.ENQUEUE_REJECTED,
        metrics.HOOK_SECONDS,
        metrics.ATTEMPTS,
        metrics.TASK_SECONDS,
        metrics.NOTIFY_FAILURES,
        metrics.PROCESS_INFO,
    ):
        assert set(collector._labelnames) <= allowed, collector
    assert [metrics.status_class(c) for c in (None, 200, 404, 503)] == [
        "error",
        "2xx",
        "4xx",
        "5xx",
    ]


async def test_a_crashed_uvicorn_worker_leaves_no_process_series(tmp_path: Path) -> None:
    # Given `ntorque web` with two uvicorn workers,
    port = support.free_port()
    env = _env(
        tmp_path,
        PORT=str(port),
        WEB_CONCURRENCY="2",
        NTORQUE_SQLITE_PATH=str(tmp_path / "web.sqlite3"),
        NTORQUE_AUTHENTICATE="false",
    )
    procs = {"web": start(["bash", "-c", "ntorque web"], env, tmp_path, tmp_path / "web.log")}
    base = f"http://127.0.0.1:{port}"

    async def pids() -> set[str]:
        expo = await scrape(api, "/metrics")
        return {ls["pid"] for ls in expo.labelsets("process_resident_memory_bytes")}

    try:
        # A new connection per request: a kept-alive one may belong to the worker killed.
        no_keepalive = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, timeout=10, limits=no_keepalive) as api:
            await support.wait_until(lambda: _answers(base), 30, 0.1)
            before = await support.wait_until(
                lambda: _when(pids(), lambda p: len(p) == 2), 30, 0.2, "two uvicorn workers"
            )
            # when one of them dies without a clean stop and uvicorn replaces it,
            dead = sorted(before)[0]
            os.kill(int(dead), signal.SIGKILL)
            # then its memory, descriptors and start time leave /metrics (the live
            # worker sweeps every few seconds): no ghost process on the dashboards.
            after = await support.wait_until(
                lambda: _when(pids(), lambda p: len(p) == 2 and dead not in p),
                30,
                0.2,
                "the dead worker's series to go",
            )
            expo = await scrape(api, "/metrics")
            for family in ("process_open_fds", "process_start_time_seconds"):
                assert {ls["pid"] for ls in expo.labelsets(family)} == after, family
    finally:
        stop_all(procs)


async def _when(value: Awaitable[set[str]], ok: Callable[[set[str]], bool]) -> set[str] | None:
    got = await value
    return got if ok(got) else None
