"""The shipped dashboards and alert rules, proven against a real Prometheus.

A Prometheus started here with the shipped scrape configs (ports templated, 1 s scrapes)
scrapes the Procfile's processes under load, both directly and through the Heroku route
(/metrics/cluster); every dashboard query (on each route) and every alert expression is then
evaluated through Prometheus's HTTP API: none may error, each must return data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests import support
from tests.support import HookServer

from .conftest import DASHBOARDS, Cluster, start, stop_all

pytestmark = [pytest.mark.prometheus]

PROMETHEUS_DIR = DASHBOARDS / "prometheus"
DIRECT_JOBS = "ntorque-web|ntorque-worker|ntorque-clock"
# A rule is `<query> <op> <number>`: the query alone must return data.
COMPARISON = re.compile(r"^(?P<query>.+?)\s*(?:>=|<=|==|!=|>|<)\s*[0-9.e+-]+\s*$", re.S)


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every target of every panel."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], target["expr"]))
    return found


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def substitute(expr: str, job: str) -> str:
    """Grafana's variables as Grafana would expand them for 'All' on a 1 s scrape."""
    return (
        expr.replace("$__rate_interval", "10s")
        .replace("$__range", "5m")
        .replace("$job", job)
        .replace("$app", ".+")
    )


def test_dashboards_are_importable_and_provisionable() -> None:
    # Every panel asks the data source variable, which the template defines; ids are unique.
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert board["uid"] and board["title"]
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), path
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
    provisioning = DASHBOARDS / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert [s["type"] for s in sources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load((provisioning / "dashboards" / "ntorque.yml").read_text())
    assert providers["providers"][0]["options"]["path"]
    assert len(dashboard_queries()) >= 20


def test_promtool_accepts_shipped_configs_and_rules(prometheus_bin: tuple[str, str]) -> None:
    _, promtool = prometheus_bin
    for config in ("prometheus.yml", "prometheus-heroku.yml"):
        done = subprocess.run(
            [promtool, "check", "config", str(PROMETHEUS_DIR / config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(
        [promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(COMPARISON.match(rule["expr"]) for rule in alert_rules())


def scrape_config(cluster: Cluster, tmp_path: Path) -> Path:
    """The shipped configs, targets pointed at this test's processes, scraped every second."""
    direct = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    heroku = yaml.safe_load((PROMETHEUS_DIR / "prometheus-heroku.yml").read_text())
    ports = {
        "ntorque-web": cluster.web_port,
        "ntorque-worker": cluster.worker_port,
        "ntorque-clock": cluster.clock_port,
    }
    jobs = []
    for job in direct["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
        jobs.append(job)
    for job in heroku["scrape_configs"]:
        job["scheme"] = "http"  # the test's web dyno speaks plain http
        job["static_configs"] = [{"targets": [f"127.0.0.1:{cluster.web_port}"]}]
        jobs.append(job)
    assert [j["job_name"] for j in jobs] == [*ports, "ntorque"]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(PROMETHEUS_DIR / name) for name in direct["rule_files"]],
        "scrape_configs": jobs,
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


async def load(api: httpx.AsyncClient, hooks: HookServer, stop: asyncio.Event) -> None:
    """Enqueue successes, failures, retries and a bad request, round after round."""
    ok = hooks.script("/load/ok", 200)
    gone = hooks.script("/load/gone", 404)
    for round_no in range(100_000):
        if stop.is_set():
            return
        flaky = hooks.script(f"/load/flaky/{round_no}", 500, 200)
        for url in (ok, ok, gone, flaky):
            await api.post("/", params={"url": url}, content=b"x")
        await api.post("/", params={"url": "nope"})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


@contextlib.asynccontextmanager
async def prometheus(binary: str, config: Path, tmp_path: Path) -> AsyncIterator[str]:
    port = support.free_port()
    proc = start(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        {"PATH": "/usr/bin:/bin"},
        tmp_path,
        tmp_path / "prometheus.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as client:

            async def ready() -> bool:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
                with contextlib.suppress(httpx.HTTPError):
                    return (await client.get(base + "/-/ready")).status_code == 200
                return False

            await support.wait_until(ready, 30, 0.2)
        yield base
    finally:
        stop_all({"prometheus": proc})


async def query(client: httpx.AsyncClient, base: str, expr: str) -> list[dict[str, Any]]:
    response = await client.get(base + "/api/v1/query", params={"query": expr})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def has_finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


@pytest.mark.slow
async def test_every_dashboard_query_and_alert_returns_data(
    cluster: Cluster, hook_server: HookServer, prometheus_bin: tuple[str, str], tmp_path: Path
) -> None:
    binary, _ = prometheus_bin
    config = scrape_config(cluster, tmp_path)
    stop = asyncio.Event()
    headers = {"NTORQUE_API_KEY": cluster.key}
    async with (
        httpx.AsyncClient(base_url=cluster.web, headers=headers, timeout=10) as api,
        prometheus(binary, config, tmp_path) as base,
        httpx.AsyncClient(timeout=10) as client,
    ):
        # Given ntorque under load, scraped directly and through /metrics/cluster,
        loader = asyncio.create_task(load(api, hook_server, stop), name="load")
        try:

            async def all_up() -> bool:
                targets = (await client.get(base + "/api/v1/targets")).json()["data"]
                active = targets["activeTargets"]
                return len(active) == 4 and all(t["health"] == "up" for t in active)

            await support.wait_until(all_up, 30, 0.5)

            # when every dashboard query is asked on each route, none errors and each has data;
            pending = {
                (board, title, substitute(expr, job))
                for board, title, expr in dashboard_queries()
                for job in (DIRECT_JOBS, "ntorque")
            }
            deadline = time.monotonic() + 60
            for _ in range(120):
                for item in sorted(pending):
                    if has_finite(await query(client, base, item[2])):
                        pending.discard(item)
                if not pending or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            assert not pending, f"queries without data: {sorted(pending)}"

            # and every alert rule evaluates: the whole rule without error, its query with data,
            for rule in alert_rules():
                await query(client, base, rule["expr"])
                match = COMPARISON.match(rule["expr"])
                assert match, rule["alert"]
                assert await query(client, base, match["query"]), rule["alert"]

            # and Prometheus itself evaluates each of them cleanly.
            async def rules_ok() -> list[dict[str, Any]] | None:
                groups = (await client.get(base + "/api/v1/rules")).json()["data"]["groups"]
                rules = [r for g in groups for r in g["rules"]]
                evaluated = all(r["health"] != "unknown" for r in rules)
                return rules if rules and evaluated else None

            rules = await support.wait_until(rules_ok, 20, 0.5)
            assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
            assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
            # With a worker up, the "no worker" alert is quiet.
            quiet = [r for r in rules if r["name"] == "NtorqueNoWorker"]
            assert quiet[0]["state"] == "inactive"
        finally:
            stop.set()
            await asyncio.wait_for(loader, 30)
