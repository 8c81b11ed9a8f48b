"""The README documents every configuration variable the code reads, and every route;
app.json (the Heroku button) describes every variable of the README's table."""

from __future__ import annotations

import json
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


# Set on Heroku by Heroku itself: the PostgreSQL add-on (DATABASE_URL), the Redis add-on
# (REDIS_URL) and the dyno manager (PORT). Listing them in app.json would offer the user a
# value that the platform overrides.
SET_BY_HEROKU = {"DATABASE_URL", "REDIS_URL", "PORT"}


def _configuration_table() -> list[list[str]]:
    """The names in the first cell of each row of the README's configuration table."""
    section = _readme().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [re.findall(r"`([A-Z][A-Z0-9_]*)`", row.split("|")[1]) for row in rows]


def _app_json_env() -> dict[str, object]:
    env = json.loads((ROOT / "app.json").read_text())["env"]
    assert isinstance(env, dict)
    return env


def test_app_json_describes_every_variable_of_the_configuration_table() -> None:
    table = _configuration_table()
    assert len(table) > 40, "the configuration table was not found"
    # The OpenTelemetry row names a few of the standard OTEL_* variables, ending in "…":
    # app.json lists the ones a Heroku user most needs, not the whole standard.
    names = {name for row in table if not any(n.startswith("OTEL_") for n in row) for name in row}
    missing = sorted(names - SET_BY_HEROKU - _app_json_env().keys())
    assert not missing, f"app.json's env lacks {missing}"


def test_app_json_lists_only_documented_variables() -> None:
    documented = {name for row in _configuration_table() for name in row}
    unknown = sorted(
        name for name in _app_json_env() if name not in documented and not name.startswith("OTEL_")
    )
    assert not unknown, f"app.json's env has variables the README's table lacks: {unknown}"


def test_app_json_env_follows_herokus_schema() -> None:
    # https://devcenter.heroku.com/articles/app-json-schema#env: a variable is a string (its
    # value) or an object of description, value, required (default true) and generator.
    for name, spec in _app_json_env().items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), name
        assert isinstance(spec, dict), f"{name}: describe it with an object"
        assert set(spec) <= {"description", "value", "required", "generator"}, name
        assert isinstance(spec.get("description"), str) and spec["description"].strip(), name
        assert "\n" not in spec["description"], f"{name}: a one-line description"
        assert spec.get("required") is False, f"{name}: every variable has a default"
        assert isinstance(spec.get("value", ""), str), f"{name}: values are strings"


def test_runtime_txt_asks_for_a_python_the_heroku_buildpack_installs() -> None:
    # The buildpack installs the latest patch release of a major version given as
    # python-3.N; an exact python-3.N.M only if that release was built for the app's stack,
    # and releases older than a stack are not built for it (python-3.11.7, of 2023, on
    # Heroku-24, of 2024): the build fails. A pinned patch also misses security fixes.
    text = (ROOT / "runtime.txt").read_text()
    match = re.fullmatch(r"python-3\.(\d+)\n?", text)
    assert match, f"runtime.txt must be python-3.N (the major version only), not {text!r}"
    assert int(match.group(1)) >= 10, "the buildpack no longer supports Python before 3.10"
    requires = re.search(r'requires-python = ">=3\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert requires and int(match.group(1)) >= int(requires.group(1))
