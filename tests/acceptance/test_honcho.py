"""The README's local recipe: the Procfile under honcho (the Python Foreman) with a .env file."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests import support
from tests.acceptance.harness import (
    FAST_ENV,
    REPO_ROOT,
    Api,
    HookServer,
    Processes,
    base_env,
    free_port,
    heroku_database_url,
    wait_http,
    wait_output,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


async def test_honcho_start_runs_the_procfile_web_worker_clock(
    processes: Processes, hook: HookServer, pg_url: str, redis_channel: str, tmp_path: Path
) -> None:
    port = free_port()
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "\n".join(
            f"{name}={value}"
            for name, value in {
                "DATABASE_URL": heroku_database_url(pg_url),
                "REDIS_URL": support.REDIS_URL,
                "NTORQUE_REDIS_CHANNEL": redis_channel,
                "PORT": str(port),
                **FAST_ENV,
            }.items()
        )
        + "\n"
    )
    honcho = f"honcho -e {dotenv} -f {REPO_ROOT / 'Procfile'} -d {REPO_ROOT}"
    env = base_env(tmp_path)

    release = await processes.run("honcho-release", f"{honcho} run ntorque migrate", env)
    assert release.returncode == 0, release.output()
    created = await processes.run(
        "honcho-create-app", f"{honcho} run ntorque create-app --name mine", env
    )
    assert created.returncode == 0, created.output()
    key = created.stdout().strip()
    assert re.fullmatch(r"[0-9a-f]{40}", key), created.stdout()

    started = processes.start("honcho", f"{honcho} start web worker clock", env)
    base = f"http://127.0.0.1:{port}"
    await wait_http(base + "/", started)
    await wait_output(started, "worker started")
    await wait_output(started, "clock started")
    api = Api(base, key)
    try:
        task_id = await api.enqueue(hook.url + "/ok")
        await api.wait_status([task_id], "COMPLETED")
    finally:
        await api.close()
    assert hook.count(task_id) == 1

    # honcho passes SIGTERM on to every process, which shut down cleanly.
    assert await processes.stop(started) in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    out = started.output()
    assert "worker stopped" in out and "clock stopped" in out, out
