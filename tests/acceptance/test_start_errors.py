"""Start-up failures an operator can fix end with one line saying what is wrong, no traceback.

The release phase against a database that is down, a one-off command against it, and every
command with an SQLite file it cannot create or write: a non-zero exit within seconds and a
message naming the cause (and the variable), as a newcomer would want to read it in
``heroku releases:output`` or on a laptop's terminal.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.acceptance.harness import Processes, base_env, free_port

COMMAND_TIMEOUT_S = 60


def assert_one_clean_message(output: str, *fragments: str) -> None:
    assert "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in output, output
    assert len(output.strip().splitlines()) <= 5, output


async def test_release_against_a_database_that_refuses_connections_fails_in_one_line(
    processes: Processes, tmp_path: Path
) -> None:
    # Given a DATABASE_URL, in Heroku's form, whose server refuses connections
    dead = f"postgres://postgres@127.0.0.1:{free_port()}/ntorque?sslmode=disable"
    env = base_env(tmp_path, DATABASE_URL=dead, NTORQUE_DB_TIMEOUT="2")

    # When the release phase and a one-off command run against it
    release = await processes.run("release", processes.procfile["release"], env)
    create = await processes.run("create-app", "ntorque create-app --name x", env)

    # Then each fails with one line saying why, and no traceback
    assert release.returncode == 1, release.output()
    assert_one_clean_message(release.output(), "ntorque: migrate failed", "ConnectionRefused")
    assert create.returncode == 1, create.output()
    assert_one_clean_message(create.output(), "ntorque: create-app failed", "ConnectionRefused")
    assert create.stdout() == ""


@pytest.mark.postgres
async def test_release_against_a_missing_database_names_it(
    processes: Processes, tmp_path: Path
) -> None:
    missing = "postgres://postgres@127.0.0.1:5432/ntorque_no_such_database_here"
    env = base_env(tmp_path, DATABASE_URL=missing)

    release = await processes.run("release", processes.procfile["release"], env)

    assert release.returncode == 1, release.output()
    assert_one_clean_message(
        release.output(), 'database "ntorque_no_such_database_here" does not exist'
    )


@pytest.mark.parametrize("where", ["under a file", "a directory"])
@pytest.mark.parametrize(
    "command",
    [
        "ntorque migrate",
        "ntorque web",
        "ntorque worker",
        "ntorque clock",
        "ntorque run",
        "ntorque create-app --name x",
    ],
)
async def test_an_sqlite_file_that_cannot_be_written_stops_every_command_naming_the_variable(
    processes: Processes, tmp_path: Path, command: str, where: str
) -> None:
    # Given NTORQUE_SQLITE_PATH where no SQLite file can be created
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    path = blocker / "ntorque.sqlite3" if where == "under a file" else tmp_path
    env = base_env(tmp_path, NTORQUE_SQLITE_PATH=str(path), PORT=str(free_port()))

    # When a command starts
    proc = await processes.run("cmd", command, env, timeout_s=COMMAND_TIMEOUT_S)

    # Then it stops at once, naming the variable and the file
    assert proc.returncode == 2, proc.output()
    assert_one_clean_message(proc.output(), "NTORQUE_SQLITE_PATH", str(path))
