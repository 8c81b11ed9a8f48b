"""A bad configuration value stops a real ``ntorque`` process with a message naming it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ntorque.settings import Settings
from ntorque.store import Store

NTORQUE = Path(sys.executable).parent / "ntorque"


@pytest.mark.parametrize(
    ("role", "name", "value"),
    [
        ("worker", "NTORQUE_MAX_RETRIES", "lots"),
        ("clock", "NTORQUE_REQUEUE_INTERVAL", "0"),
        ("web", "PORT", "http"),
    ],
)
def test_bad_value_stops_the_process(tmp_path: Path, role: str, name: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update({"NTORQUE_SQLITE_PATH": str(tmp_path / "q.sqlite3"), name: value})
    proc = subprocess.run(
        [str(NTORQUE), role], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert name in proc.stderr
    assert "Traceback" not in proc.stderr, "a configuration error is a message, not a crash"
    assert not (tmp_path / "q.sqlite3").exists(), "nothing started before the check"


def test_app_commands_create_deactivate_and_activate_a_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["NTORQUE_SQLITE_PATH"] = str(tmp_path / "q.sqlite3")

    def ntorque(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(NTORQUE), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    created = ntorque("create-app", "--name", "mine")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert len(key) == 40 and key.isalnum(), "stdout is the key alone"

    def active() -> bool:
        settings = Settings.from_env({"NTORQUE_SQLITE_PATH": env["NTORQUE_SQLITE_PATH"]})

        async def look_up() -> bool:
            store = Store.from_settings(settings)
            try:
                return await store.app_for_key(key) is not None
            finally:
                await store.close()

        return asyncio.run(look_up())

    assert active()
    assert ntorque("deactivate-app", "--name", "mine").returncode == 0
    assert not active()
    assert ntorque("activate-app", "--name", "mine").returncode == 0
    assert active()
    unknown = ntorque("deactivate-app", "--name", "nobody")
    assert unknown.returncode == 1 and "nobody" in unknown.stderr
    # A name is matched as create-app stored it (stripped), and a name two apps share says so
    assert ntorque("create-app", "--name", " mine ").returncode == 0
    both = ntorque("deactivate-app", "--name", " mine")
    assert both.returncode == 0 and "2 apps named 'mine' deactivated" in both.stderr, both.stderr
    assert not active()


def test_a_metrics_port_in_use_stops_the_process_naming_the_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env.update(
            {"NTORQUE_SQLITE_PATH": str(tmp_path / "q.sqlite3"), "NTORQUE_METRICS_PORT": str(port)}
        )
        proc = subprocess.run(
            [str(NTORQUE), "clock"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode != 0
    assert f"NTORQUE_METRICS_PORT={port}" in proc.stderr
    assert "Traceback" not in proc.stderr
