"""A bad configuration value stops a real ``ntorque`` process with a message naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
