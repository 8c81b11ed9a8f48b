"""The README documents every configuration variable the code reads, and every route."""

from __future__ import annotations

import re
from pathlib import Path

from ntorque.settings import KNOWN_VARIABLES

ROOT = Path(__file__).resolve().parent.parent


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def _read_variables() -> set[str]:
    source = (ROOT / "ntorque" / "settings.py").read_text()
    return set(re.findall(r'read\("([A-Z_]+)"', source)) | {"DATABASE_URL", "NTORQUE_SQLITE_PATH"}


def test_every_variable_read_is_in_the_configuration_table() -> None:
    table = {m for m in re.findall(r"^\| `([A-Z_]+)`", _readme(), flags=re.M)}
    missing = _read_variables() - table
    assert not missing, f"README configuration table lacks {sorted(missing)}"


def test_every_known_ntorque_variable_is_read_or_documented() -> None:
    read = _read_variables()
    readme = _readme()
    for name in KNOWN_VARIABLES - {"NTORQUE_URL"}:
        assert name in read, f"{name} is declared known but never read"
        assert f"`{name}`" in readme


def test_routes_are_documented() -> None:
    readme = _readme()
    for route in (
        "`GET /`",
        "`POST /?url=",
        "`GET /tasks/<id>`",
        "`POST /tasks/<id>/push`",
        "`GET /metrics`",
    ):
        assert route in readme
