"""Settings.from_env: every variable read and validated; defaults as SPEC §5 says."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from ntorque import db
from ntorque.settings import DATABASE_URL_PARAMETERS, KNOWN_VARIABLES, Settings, SettingsError


def test_defaults_match_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({})
    assert s.is_sqlite
    assert s.database_url == f"sqlite+aiosqlite:///{tmp_path.resolve() / 'ntorque.sqlite3'}"
    assert s.redis_url is None
    assert s.port == 5100
    assert s.backoff == "exponential"
    assert s.cleanup_after_days == 7
    assert s.default_timeout_s == 60
    assert s.min_due_delay_s == 2
    assert s.max_due_delay_s == 7200
    assert s.max_retries == 36
    assert s.requeue_interval_s == 5
    assert s.transient_request_errors == frozenset({408, 423, 429, 449})
    assert s.authenticate is True
    assert s.enable_hsts is False
    assert s.hsts_protocol_header is None
    assert s.redis_channel == "ntorque"
    assert s.mode is None and not s.development
    assert (s.pool_size, s.pool_max_overflow, s.pool_recycle_s, s.pool_class) == (
        None,
        None,
        None,
        None,
    )


# (variable, raw value, field, parsed value): each variable reaches its field.
GOOD: list[tuple[str, str, str, Any]] = [
    ("REDIS_URL", "rediss://:pw@h:6380", "redis_url", "rediss://:pw@h:6380"),
    ("PORT", "8080", "port", 8080),
    ("NTORQUE_BACKOFF", "Linear", "backoff", "linear"),
    ("NTORQUE_CLEANUP_AFTER_DAYS", "0.5", "cleanup_after_days", 0.5),
    ("NTORQUE_CLEANUP_INTERVAL", "60", "cleanup_interval_s", 60),
    ("NTORQUE_CLEANUP_BATCH", "10", "cleanup_batch", 10),
    ("NTORQUE_DEFAULT_TIMEOUT", "30", "default_timeout_s", 30),
    ("NTORQUE_MAX_TIMEOUT", "120", "max_timeout_s", 120),
    ("NTORQUE_MIN_DUE_DELAY", "0.05", "min_due_delay_s", 0.05),
    ("NTORQUE_MAX_DUE_DELAY", "60", "max_due_delay_s", 60),
    ("NTORQUE_MAX_RETRIES", "0", "max_retries", 0),
    ("NTORQUE_REQUEUE_INTERVAL", "0.1", "requeue_interval_s", 0.1),
    ("NTORQUE_REQUEUE_BATCH", "50", "requeue_batch", 50),
    ("NTORQUE_NOTIFY_BACKLOG_LIMIT", "2000", "notify_backlog_limit", 2000),
    ("NTORQUE_TRANSIENT_REQUEST_ERRORS", "418, 429", "transient_request_errors", {418, 429}),
    ("NTORQUE_AUTHENTICATE", "false", "authenticate", False),
    ("NTORQUE_AUTH_CACHE_SECONDS", "0", "auth_cache_s", 0),
    ("NTORQUE_ENABLE_HSTS", "1", "enable_hsts", True),
    ("HSTS_PROTOCOL_HEADER", "X-Forwarded-Proto", "hsts_protocol_header", "x-forwarded-proto"),
    ("NTORQUE_REDIS_CHANNEL", "jobs", "redis_channel", "jobs"),
    ("NTORQUE_REDIS_TLS_VERIFY", "yes", "redis_tls_verify", True),
    ("MODE", "development", "mode", "development"),
    # As in nTorque, any other string means "not development", so their configs start.
    ("MODE", "Staging", "mode", "staging"),
    ("SQLALCHEMY_POOL_SIZE", "5", "pool_size", 5),
    ("SQLALCHEMY_MAX_OVERFLOW", "0", "pool_max_overflow", 0),
    ("SQLALCHEMY_POOL_RECYCLE", "300", "pool_recycle_s", 300),
    ("SQLALCHEMY_POOL_TIMEOUT", "2.5", "pool_timeout_s", 2.5),
    ("SQLALCHEMY_POOL_CLASS", "sqlalchemy.pool.NullPool", "pool_class", "NullPool"),
    ("NTORQUE_DB_TIMEOUT", "3", "db_timeout_s", 3),
    ("NTORQUE_AUTO_MIGRATE", "off", "auto_migrate", False),
    ("NTORQUE_MAX_BODY_BYTES", "100", "max_body_bytes", 100),
    ("NTORQUE_BODY_TIMEOUT", "2.5", "body_timeout_s", 2.5),
    ("NTORQUE_MAX_URL_LENGTH", "100", "max_url_length", 100),
    ("NTORQUE_MAX_PASSTHROUGH_HEADERS", "3", "max_passthrough_headers", 3),
    ("NTORQUE_WORKER_CONCURRENCY", "7", "worker_concurrency", 7),
    ("NTORQUE_POLL_INTERVAL", "0.05", "poll_interval_s", 0.05),
    ("NTORQUE_SHUTDOWN_GRACE", "10", "shutdown_grace_s", 10),
    ("NTORQUE_MAX_REDIRECTS", "0", "max_redirects", 0),
    ("NTORQUE_MAX_RESPONSE_BYTES", "10", "max_response_bytes", 10),
    ("NTORQUE_METRICS_PORT", "9100", "metrics_port", 9100),
    ("NTORQUE_METRICS_PUBLISH_INTERVAL", "5", "metrics_publish_interval_s", 5),
    ("WEB_CONCURRENCY", "4", "web_concurrency", 4),
    ("FORWARDED_ALLOW_IPS", "10.0.0.0/8, 127.0.0.1", "forwarded_allow_ips", "10.0.0.0/8,127.0.0.1"),
    ("NTORQUE_LOG_LEVEL", "debug", "log_level", "DEBUG"),
    ("NTORQUE_BOOTSTRAP_APP", "false", "bootstrap_app", False),
]


@pytest.mark.parametrize(("name", "raw", "field", "expected"), GOOD, ids=[g[0] for g in GOOD])
def test_each_variable_is_read(name: str, raw: str, field: str, expected: Any) -> None:
    settings = Settings.from_env({name: raw})
    value = getattr(settings, field)
    assert (set(value) if isinstance(value, frozenset) else value) == expected


@pytest.mark.parametrize(
    ("raw", "development"),
    [(" Development ", True), ("production", False), ("staging", False), ("", False)],
)
def test_only_mode_development_turns_on_reload_and_detailed_errors(
    raw: str, development: bool
) -> None:
    assert Settings.from_env({"MODE": raw}).development is development


def test_every_known_variable_is_covered_by_the_table() -> None:
    covered = {g[0] for g in GOOD} | {"NTORQUE_SQLITE_PATH", "NTORQUE_CA_BUNDLE", "NTORQUE_URL"}
    assert {v for v in KNOWN_VARIABLES if v not in covered} == set()


BAD: list[tuple[str, str]] = [
    ("PORT", "abc"),
    ("PORT", "70000"),
    ("PORT", "-1"),
    ("NTORQUE_BACKOFF", "fibonacci"),
    ("NTORQUE_CLEANUP_AFTER_DAYS", "-1"),
    ("NTORQUE_CLEANUP_AFTER_DAYS", "seven"),
    ("NTORQUE_CLEANUP_INTERVAL", "0"),
    ("NTORQUE_CLEANUP_BATCH", "0"),
    ("NTORQUE_DEFAULT_TIMEOUT", "0"),
    ("NTORQUE_DEFAULT_TIMEOUT", "1.5"),
    ("NTORQUE_MAX_TIMEOUT", "0"),
    ("NTORQUE_MIN_DUE_DELAY", "-1"),
    ("NTORQUE_MIN_DUE_DELAY", "nan"),
    ("NTORQUE_MIN_DUE_DELAY", "inf"),
    ("NTORQUE_MAX_DUE_DELAY", "soon"),
    ("NTORQUE_MAX_RETRIES", "abc"),
    ("NTORQUE_MAX_RETRIES", "-1"),
    ("NTORQUE_MAX_RETRIES", "3.0"),
    ("NTORQUE_MAX_RETRIES", "1001"),
    ("NTORQUE_REQUEUE_INTERVAL", "0"),
    ("NTORQUE_REQUEUE_BATCH", "0"),
    ("NTORQUE_NOTIFY_BACKLOG_LIMIT", "0"),
    ("NTORQUE_TRANSIENT_REQUEST_ERRORS", "500"),
    ("NTORQUE_TRANSIENT_REQUEST_ERRORS", "408;429"),
    ("NTORQUE_TRANSIENT_REQUEST_ERRORS", "abc"),
    ("NTORQUE_AUTHENTICATE", "maybe"),
    ("NTORQUE_AUTH_CACHE_SECONDS", "-1"),
    ("NTORQUE_ENABLE_HSTS", "2"),
    ("HSTS_PROTOCOL_HEADER", "X-Forwarded-Proto:"),
    ("HSTS_PROTOCOL_HEADER", "X Forwarded Proto"),
    ("NTORQUE_REDIS_TLS_VERIFY", "sure"),
    ("SQLALCHEMY_POOL_SIZE", "0"),
    ("SQLALCHEMY_POOL_SIZE", "big"),
    ("SQLALCHEMY_MAX_OVERFLOW", "-2"),
    ("SQLALCHEMY_POOL_RECYCLE", "x"),
    ("SQLALCHEMY_POOL_TIMEOUT", "0"),
    ("SQLALCHEMY_POOL_CLASS", "FooPool"),
    ("SQLALCHEMY_POOL_CLASS", "StaticPool"),  # crashed every PostgreSQL process (TypeError)
    ("SQLALCHEMY_POOL_CLASS", "sqlalchemy.pool.StaticPool"),
    ("NTORQUE_DB_TIMEOUT", "0"),
    ("NTORQUE_AUTO_MIGRATE", "perhaps"),
    ("NTORQUE_MAX_BODY_BYTES", "-1"),
    ("NTORQUE_BODY_TIMEOUT", "0"),
    ("NTORQUE_MAX_URL_LENGTH", "5"),
    ("NTORQUE_MAX_PASSTHROUGH_HEADERS", "-1"),
    ("NTORQUE_WORKER_CONCURRENCY", "0"),
    ("NTORQUE_POLL_INTERVAL", "0"),
    ("NTORQUE_SHUTDOWN_GRACE", "-1"),
    ("NTORQUE_MAX_REDIRECTS", "101"),
    ("NTORQUE_CA_BUNDLE", "/nonexistent/ca.pem"),
    ("NTORQUE_MAX_RESPONSE_BYTES", "-1"),
    ("NTORQUE_METRICS_PORT", "70000"),
    ("NTORQUE_METRICS_PUBLISH_INTERVAL", "0"),
    ("WEB_CONCURRENCY", "0"),
    ("FORWARDED_ALLOW_IPS", "proxy.example"),
    ("FORWARDED_ALLOW_IPS", " , "),
    ("NTORQUE_LOG_LEVEL", "loud"),
    ("NTORQUE_BOOTSTRAP_APP", "x"),
    ("REDIS_URL", "http://localhost:6379"),
    ("DATABASE_URL", "mysql://h/db"),
    ("DATABASE_URL", "postgres://h/db?sslmode=bogus"),
    ("DATABASE_URL", "postgres://h/db?connect_timeout=0"),
    ("DATABASE_URL", "postgres://h/db?target_session_attrs=master"),
    ("DATABASE_URL", "postgres://h/db?keepalives=1"),
    ("DATABASE_URL", "postgres://h:abc/db"),
    ("DATABASE_URL", "postgres://h:99999/db"),
    # Too large for what uses them: a timeout over the INTEGER column (the enqueue batch
    # failed, 503), a retry delay whose due date cannot be printed (GET /tasks/<id>: 500),
    # timers beyond what asyncio and Redis accept.
    ("NTORQUE_MAX_TIMEOUT", "2147483648"),
    ("NTORQUE_DEFAULT_TIMEOUT", "99999999999"),
    ("NTORQUE_MAX_DUE_DELAY", "1e12"),
    ("NTORQUE_MIN_DUE_DELAY", "1e12"),
    ("NTORQUE_POLL_INTERVAL", "1e300"),
    ("NTORQUE_REQUEUE_INTERVAL", "1e300"),
    ("NTORQUE_CLEANUP_INTERVAL", "1e300"),
    ("NTORQUE_METRICS_PUBLISH_INTERVAL", "1e300"),
    ("NTORQUE_SHUTDOWN_GRACE", "1e300"),
    ("NTORQUE_DB_TIMEOUT", "1e300"),
    ("SQLALCHEMY_POOL_TIMEOUT", "1e300"),
    ("NTORQUE_AUTH_CACHE_SECONDS", "1e300"),
]


@pytest.mark.parametrize(("name", "raw"), BAD, ids=[f"{n}={r}" for n, r in BAD])
def test_bad_values_raise_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: raw})
    assert name in str(info.value)


def test_the_largest_values_allowed_are_accepted() -> None:
    s = Settings.from_env(
        {
            "NTORQUE_MAX_TIMEOUT": "2147483647",
            "NTORQUE_DEFAULT_TIMEOUT": "2147483647",
            "NTORQUE_MAX_DUE_DELAY": "31536000",
            "NTORQUE_POLL_INTERVAL": "31536000",
        }
    )
    assert (s.max_timeout_s, s.max_due_delay_s) == (2147483647, 31536000)


def test_combinations_are_checked() -> None:
    with pytest.raises(SettingsError, match=r"NTORQUE_DEFAULT_TIMEOUT.*NTORQUE_MAX_TIMEOUT"):
        Settings.from_env({"NTORQUE_DEFAULT_TIMEOUT": "100", "NTORQUE_MAX_TIMEOUT": "50"})
    with pytest.raises(SettingsError, match="NTORQUE_DEFAULT_TIMEOUT"):
        Settings.from_env({}).replace(default_timeout_s=4000)


def test_a_default_timeout_above_the_implicit_maximum_raises_it() -> None:
    # nTorque 0.4 had no NTORQUE_MAX_TIMEOUT: its users' long default must keep working.
    s = Settings.from_env({"NTORQUE_DEFAULT_TIMEOUT": "7200"})
    assert (s.default_timeout_s, s.max_timeout_s) == (7200, 7200)
    assert Settings.from_env({"NTORQUE_DEFAULT_TIMEOUT": "30"}).max_timeout_s == 3600


@pytest.mark.parametrize("cap", ["1", "0"])
def test_a_cap_below_the_first_delay_is_accepted_and_wins(
    cap: str, caplog: pytest.LogCaptureFixture
) -> None:
    # SPEC §4: backoff is never above NTORQUE_MAX_DUE_DELAY, whatever NTORQUE_MIN_DUE_DELAY is.
    with caplog.at_level(logging.WARNING, logger="ntorque.settings"):
        s = Settings.from_env({"NTORQUE_MAX_DUE_DELAY": cap})
    assert (s.min_due_delay_s, s.max_due_delay_s) == (2, float(cap))
    assert "NTORQUE_MAX_DUE_DELAY" in caplog.text


def test_blank_values_mean_the_default() -> None:
    assert Settings.from_env({"NTORQUE_MAX_RETRIES": "  ", "PORT": ""}).max_retries == 36


@pytest.mark.parametrize(
    ("raw", "url", "connect_args"),
    [
        (
            "postgres://u:p@db.example.com:5432/d1?sslmode=require",
            "postgresql+asyncpg://u:p@db.example.com:5432/d1",
            {"ssl": "require"},
        ),
        (
            "postgresql://u@h/d?sslmode=disable&application_name=x",
            "postgresql+asyncpg://u@h/d",
            {"ssl": "disable", "server_settings": {"application_name": "x"}},
        ),
        ("postgres://h/d", "postgresql+asyncpg://h/d", {}),
        ("postgresql+asyncpg://h/d", "postgresql+asyncpg://h/d", {}),
        ("sqlite:////var/data/x.db", "sqlite+aiosqlite:////var/data/x.db", {}),
    ],
)
def test_database_url_normalisation(raw: str, url: str, connect_args: dict[str, str]) -> None:
    settings = Settings.from_env({"DATABASE_URL": raw})
    assert settings.database_url == url
    assert settings.database_connect_args == connect_args


def test_sqlite_path_variable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "q.db"
    settings = Settings.from_env({"NTORQUE_SQLITE_PATH": str(path)})
    assert settings.database_url == f"sqlite+aiosqlite:///{path}"


def test_secrets_stay_out_of_repr() -> None:
    settings = Settings.from_env(
        {"DATABASE_URL": "postgres://u:hunter2@h/d", "REDIS_URL": "redis://:s3cret@h:1"}
    )
    assert "hunter2" not in repr(settings)
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("REDIS_URL", "http://:s3cret@h:6379"),
        ("REDIS_URL", "redis://:s3cret@h:port"),
        ("REDIS_URL", "redis://:s3cret/x@h:6379"),
        ("DATABASE_URL", "postgres://u:s3cret/x@h:5432/d"),
        ("DATABASE_URL", "postgres://u:s3cret#x@h:5432/d"),
        ("DATABASE_URL", "postgres://u:x?s3cret@h:5432/d"),
        ("DATABASE_URL", "postgres://u:s3cret@h:port/d"),
    ],
)
def test_bad_urls_are_refused_without_printing_their_password(name: str, raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: raw})
    assert str(info.value).startswith(f"{name}: ")
    assert "s3cret" not in str(info.value)


def test_unknown_ntorque_variables_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ntorque.settings"):
        Settings.from_env({"NTORQUE_MAX_RETIRES": "3"})
    assert "NTORQUE_MAX_RETIRES" in caplog.text


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.max_retries = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("query", "connect_args"),
    [
        ("application_name=foo", {"server_settings": {"application_name": "foo"}}),
        # Percent-decoded as libpq does, a plus sign staying a plus sign.
        ("application_name=my%20app+1", {"server_settings": {"application_name": "my app+1"}}),
        ("connect_timeout=10", {"timeout": 10.0}),
        (
            "options=-c%20search_path%3Dq%20-c%20statement_timeout%3D5000",
            {"server_settings": {"options": "-c search_path=q -c statement_timeout=5000"}},
        ),
        ("options=", {}),
        ("target_session_attrs=read-write", {"target_session_attrs": "read-write"}),
        ("ssl=require", {"ssl": "require"}),
        (
            "sslmode=require&application_name=a&connect_timeout=3&options=-csearch_path%3Dq"
            "&target_session_attrs=primary",
            {
                "ssl": "require",
                "timeout": 3.0,
                "target_session_attrs": "primary",
                "server_settings": {"application_name": "a", "options": "-csearch_path=q"},
            },
        ),
        ("&sslmode=disable&", {"ssl": "disable"}),
    ],
)
def test_database_url_libpq_parameters(query: str, connect_args: dict[str, object]) -> None:
    settings = Settings.from_env({"DATABASE_URL": f"postgres://u:p@h:5433/d?{query}"})
    # The query never reaches SQLAlchemy, which would pass it to asyncpg.connect.
    assert settings.database_url == "postgresql+asyncpg://u:p@h:5433/d"
    assert settings.database_connect_args == connect_args


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("keepalives=1", r"unsupported query parameter 'keepalives'"),
        ("prepared_statement_cache_size=0", r"unsupported query parameter 'prepared_statement"),
        ("sslrootcert=%2Fca.pem", r"unsupported query parameter 'sslrootcert'"),
        ("application_name", r"'application_name' has no value"),
        ("connect_timeout=2.5", r"connect_timeout='2.5' must be a whole number"),
        ("connect_timeout=-1", r"connect_timeout='-1' must be a whole number"),
        ("connect_timeout=", r"connect_timeout='' must be a whole number"),
        ("target_session_attrs=master", r"unknown target_session_attrs 'master'"),
        ("sslmode=on", r"unknown sslmode 'on'"),
    ],
)
def test_database_url_bad_parameters_name_the_variable(query: str, message: str) -> None:
    with pytest.raises(SettingsError, match=r"^DATABASE_URL: .*" + message) as info:
        Settings.from_env({"DATABASE_URL": f"postgres://u:hunter2@h/d?{query}"})
    assert "hunter2" not in str(info.value)


def test_unsupported_parameter_error_lists_the_honoured_ones() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"DATABASE_URL": "postgres://h/d?sslmode=disable&foo=bar"})
    for name in DATABASE_URL_PARAMETERS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (
            "",
            {
                "timeout": 5,
                "command_timeout": 30.0,
                "server_settings": {"application_name": "ntorque"},
            },
        ),
        (
            "sslmode=require&connect_timeout=9&options=-c%20search_path%3Dq"
            "&target_session_attrs=read-write",
            {
                "timeout": 9.0,
                "command_timeout": 30.0,
                "ssl": "require",
                "target_session_attrs": "read-write",
                "server_settings": {"application_name": "ntorque", "options": "-c search_path=q"},
            },
        ),
        (
            "application_name=mine",
            {
                "timeout": 5,
                "command_timeout": 30.0,
                "server_settings": {"application_name": "mine"},
            },
        ),
    ],
)
def test_asyncpg_connect_args_merge_the_url_over_the_defaults(
    query: str, expected: dict[str, object]
) -> None:
    settings = Settings.from_env({"DATABASE_URL": f"postgres://h/d?{query}"})
    assert db.asyncpg_connect_args(settings) == expected
    # A fresh dict every time: the store's pool adds its own server settings to it.
    db.asyncpg_connect_args(settings)["server_settings"]["x"] = "y"
    assert "x" not in db.asyncpg_connect_args(settings)["server_settings"]
    assert "x" not in str(settings.database_connect_args)


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({}, 3600),
        ({"NTORQUE_CLEANUP_AFTER_DAYS": "30"}, 3600),
        ({"NTORQUE_CLEANUP_AFTER_DAYS": "0.5"}, 432),
        ({"NTORQUE_CLEANUP_AFTER_DAYS": "0"}, 5),
        ({"NTORQUE_CLEANUP_AFTER_DAYS": "0", "NTORQUE_REQUEUE_INTERVAL": "1"}, 1),
        ({"NTORQUE_CLEANUP_AFTER_DAYS": "0", "NTORQUE_CLEANUP_INTERVAL": "60"}, 60),
        ({"NTORQUE_CLEANUP_INTERVAL": "7200"}, 7200),
    ],
)
def test_cleanup_interval_follows_a_short_retention(env: dict[str, str], interval: float) -> None:
    assert Settings.from_env(env).cleanup_interval_s == pytest.approx(interval)


def test_sqlalchemy_pool_variables_reach_the_engine() -> None:
    pg = {"DATABASE_URL": "postgres://u@db.example/d"}
    pool = db.create_engine(
        Settings.from_env(
            {
                **pg,
                "SQLALCHEMY_POOL_SIZE": "7",
                "SQLALCHEMY_MAX_OVERFLOW": "3",
                "SQLALCHEMY_POOL_RECYCLE": "300",
                "SQLALCHEMY_POOL_TIMEOUT": "9",
            }
        )
    ).pool
    assert (pool.size(), pool._max_overflow, pool._recycle, pool._timeout) == (7, 3, 300, 9)
    nullpool = Settings.from_env({**pg, "SQLALCHEMY_POOL_CLASS": "sqlalchemy.pool.NullPool"})
    assert type(db.create_engine(nullpool).pool).__name__ == "NullPool"
