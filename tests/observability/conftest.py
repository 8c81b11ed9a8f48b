"""Fixtures for the observability tests: the Procfile's processes on PostgreSQL + Redis,
a Prometheus text parser, and a Prometheus binary (or a loud skip outside CI)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import support

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
VENV_BIN = Path(sys.executable).parent
PUBLISH_INTERVAL_S = 0.2


# -- reading an exposition ------------------------------------------------------------------


@dataclasses.dataclass
class Exposition:
    """Parsed Prometheus text: families by name and every sample."""

    families: dict[str, str]  # family name -> type
    samples: list[tuple[str, dict[str, str], float]]

    @classmethod
    def parse(cls, text: str) -> Exposition:
        families: dict[str, str] = {}
        samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            families[family.name] = family.type
            samples.extend((s.name, dict(s.labels), s.value) for s in family.samples)
        return cls(families, samples)

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``; NaN if none."""
        found = [v for n, ls, v in self.samples if n == name and labels.items() <= ls.items()]
        return math.fsum(found) if found else math.nan

    def labelsets(self, name: str) -> list[dict[str, str]]:
        return [ls for n, ls, _ in self.samples if n == name]


async def scrape(client: httpx.AsyncClient, url: str) -> Exposition:
    response = await client.get(url)
    assert response.status_code == 200, (url, response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("text/plain")
    return Exposition.parse(response.text)


# -- the Procfile's processes ---------------------------------------------------------------


def procfile() -> dict[str, str]:
    lines = {}
    for raw in (REPO / "Procfile").read_text().splitlines():
        name, _, command = raw.partition(":")
        if command.strip():
            lines[name.strip()] = command.strip()
    return lines


@dataclasses.dataclass
class Cluster:
    """web (2 uvicorn workers), worker and clock started from the Procfile, as dynos."""

    web_port: int
    worker_port: int
    clock_port: int
    channel: str
    key: str
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict)

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def worker_metrics(self) -> str:
        return f"http://127.0.0.1:{self.worker_port}/metrics"

    @property
    def clock_metrics(self) -> str:
        return f"http://127.0.0.1:{self.clock_port}/metrics"

    def output(self) -> str:
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


def _heroku_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(("postgres", parts.netloc, parts.path, parts.query, ""))


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": f"{VENV_BIN}{os.pathsep}/usr/local/bin{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        **support.FAST_ENV,
        "NTORQUE_REQUEUE_INTERVAL": "0.2",
        "NTORQUE_POLL_INTERVAL": "0.2",
        "NTORQUE_METRICS_PUBLISH_INTERVAL": str(PUBLISH_INTERVAL_S),
        "SQLALCHEMY_POOL_SIZE": "3",
        "SQLALCHEMY_MAX_OVERFLOW": "2",
    }
    env.update(extra)
    return env


async def _wait_http(client: httpx.AsyncClient, url: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + 30
    for _ in range(600):
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited ({proc.returncode}):\n{cluster.output()}")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get(url)).status_code == 200:
                return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not answer within 30s:\n{cluster.output()}")


@pytest.fixture
async def cluster(pg_url: str, redis_channel: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    """The Procfile's web (WEB_CONCURRENCY=2), worker and clock on PostgreSQL + Redis."""
    logs = tmp_path / "logs"
    logs.mkdir()
    common = {
        "DATABASE_URL": _heroku_url(pg_url),
        "REDIS_URL": support.REDIS_URL,
        "NTORQUE_REDIS_CHANNEL": redis_channel,
    }
    key = create_app_key(_env(tmp_path, **common), "obs")
    cluster = Cluster(
        web_port=support.free_port(),
        worker_port=support.free_port(),
        clock_port=support.free_port(),
        channel=redis_channel,
        key=key,
        logs=logs,
    )
    lines = procfile()
    roles = {
        "web": {"PORT": str(cluster.web_port), "WEB_CONCURRENCY": "2", "DYNO": "web.1"},
        "worker": {"NTORQUE_METRICS_PORT": str(cluster.worker_port), "DYNO": "worker.1"},
        "clock": {"NTORQUE_METRICS_PORT": str(cluster.clock_port), "DYNO": "clock.1"},
    }
    try:
        for role, extra in roles.items():
            cluster.procs[role] = start(
                ["bash", "-c", lines[role]],
                _env(tmp_path, **common, **extra),
                tmp_path,
                logs / f"{role}.log",
            )
        async with httpx.AsyncClient(timeout=10) as client:
            await _wait_http(client, cluster.web + "/", cluster)
            await _wait_http(client, cluster.worker_metrics, cluster)
            await _wait_http(client, cluster.clock_metrics, cluster)
        yield cluster
    finally:
        stop_all(cluster.procs)


def create_app_key(env: dict[str, str], name: str) -> str:
    """``ntorque create-app --name NAME``: the printed API key."""
    created = subprocess.run(
        [str(VENV_BIN / "ntorque"), "create-app", "--name", name],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return created.stdout.decode().strip()


def start(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start a process in its own process group (a dyno), its output to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group we started, then SIGKILL what is left after a grace."""
    for proc in procs.values():
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for proc in procs.values():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the processes' output to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Cluster):
                report.sections.append(("ntorque processes", value.output()))


# -- Prometheus -----------------------------------------------------------------------------


@pytest.fixture
def prometheus_bin() -> tuple[str, str]:
    """Paths of ``prometheus`` and ``promtool``; outside CI a missing binary skips loudly."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if None in found:
        message = (
            "PROMETHEUS MISSING: the shipped dashboards and alert rules were NOT checked "
            "(apt-get install prometheus; .ci/run installs it)"
        )
        if support.ci():
            pytest.fail(message)
        pytest.skip(message)
    return str(found[0]), str(found[1])
