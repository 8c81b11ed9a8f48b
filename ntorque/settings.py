"""All configuration, read once from the environment into one frozen, typed object."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

logger = logging.getLogger("ntorque.settings")

T = TypeVar("T")


class SettingsError(ValueError):
    """A configuration variable has a value ntorque cannot use."""


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("must be true or false (also accepted: 1/0, yes/no, on/off)")


def _int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    def cast(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError("must be an integer") from None
        if lo is not None and value < lo:
            raise ValueError(f"must be at least {lo}")
        if hi is not None and value > hi:
            raise ValueError(f"must be at most {hi}")
        return value

    return cast


def _float_range(lo: float | None = None, hi: float | None = None) -> Callable[[str], float]:
    def cast(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError("must be a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        if lo is not None and value < lo:
            raise ValueError(f"must be at least {lo:.15g}")
        if hi is not None and value > hi:
            raise ValueError(f"must be at most {hi:.15g}")
        return value

    return cast


def _choice(*choices: str) -> Callable[[str], str]:
    def cast(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of: {', '.join(choices)}")
        return value

    return cast


def _mode(raw: str) -> str:
    return raw.strip().lower()


def _status_codes(raw: str) -> frozenset[int]:
    codes: set[int] = set()
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or not 400 <= int(part) <= 499:
            raise ValueError(f"{part!r} is not a 4xx status code (a comma-separated list)")
        codes.add(int(part))
    return frozenset(codes)


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header_name(raw: str) -> str:
    value = raw.strip()
    if not _HEADER_NAME.fullmatch(value):
        # It would never match a request's header: the https redirect would silently never happen.
        raise ValueError("must be an HTTP header name, such as X-Forwarded-Proto")
    return value.lower()


def _trusted_proxies(raw: str) -> str:
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items:
        raise ValueError("must be * or a comma-separated list of IP addresses or networks")
    for item in items:
        if item == "*":
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(
                f"{item!r} is not an IP address or network (use * to trust every peer)"
            ) from None
    return ",".join(items)


def _pool_class(raw: str) -> str:
    value = raw.strip()
    short = value.rsplit(".", 1)[-1]
    allowed = {"NullPool", "QueuePool", "AsyncAdaptedQueuePool"}
    if short == "StaticPool":
        # One connection for every concurrent request: their transactions would interleave.
        raise ValueError(
            "StaticPool shares one connection between concurrent requests; "
            "use QueuePool (the default) or NullPool"
        )
    if short not in allowed:
        raise ValueError(f"must be one of {', '.join(sorted(allowed))} (e.g. NullPool)")
    return short


# Upper bounds that keep values within what the rest can represent: a task's timeout is an
# INTEGER column; any other duration (a retry delay, an interval, a timeout) at most a year,
# so due dates stay printable and timers within what asyncio and Redis accept.
MAX_TASK_TIMEOUT_S = 2**31 - 1
MAX_SECONDS = 365 * 24 * 3600


SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
SESSION_ATTRS = ("any", "primary", "standby", "read-write", "read-only", "prefer-standby")
# The libpq query parameters a DATABASE_URL may carry; anything else stops the process
# (SQLAlchemy would hand it to asyncpg.connect as a keyword argument, which crashes).
DATABASE_URL_PARAMETERS = (
    "sslmode",
    "application_name",
    "connect_timeout",
    "options",
    "target_session_attrs",
)


def _database_url_parameter(key: str, value: str, connect_args: dict[str, Any]) -> None:
    """Translate one libpq query parameter into asyncpg connect arguments."""
    server_settings: dict[str, str] = connect_args.setdefault("server_settings", {})
    if key in ("sslmode", "ssl"):  # ssl=: asyncpg's own spelling
        if value not in SSL_MODES:
            raise ValueError(f"unknown sslmode {value!r} (one of: {', '.join(SSL_MODES)})")
        connect_args["ssl"] = value
    elif key == "application_name":
        server_settings["application_name"] = value
    elif key == "connect_timeout":
        # libpq waits for ever on 0 or a negative value; ntorque always bounds connecting.
        if not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise ValueError(
                f"connect_timeout={value!r} must be a whole number of seconds, at least 1"
            )
        connect_args["timeout"] = float(int(value))
    elif key == "options":
        # libpq sends options verbatim in the startup packet; so does asyncpg as a server
        # setting, and the server parses it (-c name=value, --name=value) as for libpq.
        if value.strip():
            server_settings["options"] = value
    elif key == "target_session_attrs":
        if value not in SESSION_ATTRS:
            raise ValueError(
                f"unknown target_session_attrs {value!r} (one of: {', '.join(SESSION_ATTRS)})"
            )
        connect_args["target_session_attrs"] = value
    else:
        raise ValueError(
            f"unsupported query parameter {key!r} "
            f"(ntorque honours {', '.join(DATABASE_URL_PARAMETERS)})"
        )


def _check_authority(parts: SplitResult) -> None:
    """A URL's credentials and port, checked without quoting any part of them.

    A password with an unencoded ``/``, ``?`` or ``#`` ends the URL's authority early: the
    rest of the password would be read as the port, path or query, and a message quoting
    those would print it.
    """
    if "@" not in parts.netloc and "@" in parts.path + parts.query + parts.fragment:
        raise ValueError(
            "the user name or password contains '/', '?' or '#': percent-encode them"
            " (%2F, %3F, %23)"
        )
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("the port must be a number from 0 to 65535") from None


def normalise_database_url(raw: str) -> tuple[str, dict[str, Any]]:
    """Turn a Heroku-style ``postgres://…?sslmode=…`` URL into one SQLAlchemy+asyncpg accept.

    Returns the URL, without its query string, and the asyncpg connect arguments that the
    query's libpq parameters imply (``ssl``, ``timeout``, ``target_session_attrs`` and
    ``server_settings``). Any other parameter is a :class:`ValueError`.
    """
    parts = urlsplit(raw.strip())
    scheme = parts.scheme.lower()
    if scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        _check_authority(parts)
        connect_args: dict[str, Any] = {}
        # Split as libpq does: percent-decoding only ("+" stays a plus sign).
        for item in parts.query.split("&"):
            if not item:
                continue
            key, equals, value = item.partition("=")
            if not equals:
                raise ValueError(f"query parameter {unquote(key)!r} has no value")
            _database_url_parameter(unquote(key), unquote(value), connect_args)
        if not connect_args.get("server_settings"):
            connect_args.pop("server_settings", None)
        # Not urlunsplit: it drops the "//" of a host-less URL (postgres:///ntorque, libpq's
        # local server), which SQLAlchemy then cannot parse.
        url = f"postgresql+asyncpg://{parts.netloc}{parts.path}"
        return url, connect_args
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        # Swap the scheme only: urlunsplit would turn sqlite:////abs into sqlite://abs.
        return "sqlite+aiosqlite" + raw.strip()[len(parts.scheme) :], {}
    raise ValueError("must be a postgres://, postgresql:// or sqlite:// URL")


def _redis_url(raw: str) -> str:
    value = raw.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    _check_authority(parts)
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """ntorque's configuration. Build it with :func:`Settings.from_env`; tests pass one in."""

    database_url: str = dataclasses.field(repr=False)
    database_connect_args: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    redis_url: str | None = dataclasses.field(default=None, repr=False)
    port: int = 5100
    backoff: Literal["exponential", "linear"] = "exponential"
    cleanup_after_days: float = 7
    cleanup_interval_s: float = 3600
    cleanup_batch: int = 1000
    default_timeout_s: int = 60
    max_timeout_s: int = 3600
    min_due_delay_s: float = 2
    max_due_delay_s: float = 7200
    max_retries: int = 36
    requeue_interval_s: float = 5
    requeue_batch: int = 1000
    notify_backlog_limit: int = 10000
    transient_request_errors: frozenset[int] = frozenset({408, 423, 429, 449})
    authenticate: bool = True
    auth_cache_s: float = 5
    enable_hsts: bool = False
    hsts_protocol_header: str | None = None
    redis_channel: str = "ntorque"
    redis_tls_verify: bool = False
    mode: str | None = None
    pool_size: int | None = None
    pool_max_overflow: int | None = None
    pool_recycle_s: int | None = None
    pool_timeout_s: float | None = None
    pool_class: str | None = None
    db_timeout_s: float = 5
    auto_migrate: bool = True
    max_body_bytes: int = 1024 * 1024
    body_timeout_s: float = 30
    max_url_length: int = 2048
    max_passthrough_headers: int = 32
    worker_concurrency: int = 100
    poll_interval_s: float = 0.5
    shutdown_grace_s: float = 25
    max_redirects: int = 10
    ca_bundle: str | None = None
    max_response_bytes: int = 64 * 1024
    metrics_port: int | None = None
    metrics_publish_interval_s: float = 15
    web_concurrency: int = 1
    # Peers whose X-Forwarded-For/-Proto uvicorn believes: Heroku's router is every peer.
    forwarded_allow_ips: str = "*"
    log_level: str = "INFO"
    bootstrap_app: bool = True

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def development(self) -> bool:
        return self.mode == "development"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; raise :class:`SettingsError` naming the bad one."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        def read(
            name: str, field: str, cast: Callable[[str], Any], *, secret: bool = False
        ) -> None:
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return
            try:
                values[field] = cast(raw)
            except ValueError as exc:
                # A secret's value (a URL with its password) is never printed.
                shown = name if secret else f"{name}={raw!r}"
                raise SettingsError(f"{shown}: {exc}") from None

        raw_db = env.get("DATABASE_URL", "").strip()
        if raw_db:
            try:
                url, connect_args = normalise_database_url(raw_db)
            except ValueError as exc:
                raise SettingsError(f"DATABASE_URL: {exc}") from None
        else:
            path = Path(env.get("NTORQUE_SQLITE_PATH", "").strip() or "ntorque.sqlite3")
            url, connect_args = f"sqlite+aiosqlite:///{path.expanduser().resolve()}", {}
        values["database_url"] = url
        values["database_connect_args"] = connect_args

        read("REDIS_URL", "redis_url", _redis_url, secret=True)
        read("PORT", "port", _int_range(0, 65535))
        read("NTORQUE_BACKOFF", "backoff", _choice("exponential", "linear"))
        read("NTORQUE_CLEANUP_AFTER_DAYS", "cleanup_after_days", _float_range(0))
        read("NTORQUE_CLEANUP_INTERVAL", "cleanup_interval_s", _float_range(0.01, MAX_SECONDS))
        read("NTORQUE_CLEANUP_BATCH", "cleanup_batch", _int_range(1, 100_000))
        read("NTORQUE_DEFAULT_TIMEOUT", "default_timeout_s", _int_range(1, MAX_TASK_TIMEOUT_S))
        read("NTORQUE_MAX_TIMEOUT", "max_timeout_s", _int_range(1, MAX_TASK_TIMEOUT_S))
        read("NTORQUE_MIN_DUE_DELAY", "min_due_delay_s", _float_range(0, MAX_SECONDS))
        read("NTORQUE_MAX_DUE_DELAY", "max_due_delay_s", _float_range(0, MAX_SECONDS))
        read("NTORQUE_MAX_RETRIES", "max_retries", _int_range(0, 1000))
        read("NTORQUE_REQUEUE_INTERVAL", "requeue_interval_s", _float_range(0.01, MAX_SECONDS))
        read("NTORQUE_REQUEUE_BATCH", "requeue_batch", _int_range(1, 100_000))
        read("NTORQUE_NOTIFY_BACKLOG_LIMIT", "notify_backlog_limit", _int_range(1))
        read("NTORQUE_TRANSIENT_REQUEST_ERRORS", "transient_request_errors", _status_codes)
        read("NTORQUE_AUTHENTICATE", "authenticate", _bool)
        read("NTORQUE_AUTH_CACHE_SECONDS", "auth_cache_s", _float_range(0, MAX_SECONDS))
        read("NTORQUE_ENABLE_HSTS", "enable_hsts", _bool)
        read("HSTS_PROTOCOL_HEADER", "hsts_protocol_header", _header_name)
        read("NTORQUE_REDIS_CHANNEL", "redis_channel", str.strip)
        read("NTORQUE_REDIS_TLS_VERIFY", "redis_tls_verify", _bool)
        # nTorque took any other string for "not development": its users' configs may say so.
        read("MODE", "mode", _mode)
        read("SQLALCHEMY_POOL_SIZE", "pool_size", _int_range(1))
        read("SQLALCHEMY_MAX_OVERFLOW", "pool_max_overflow", _int_range(-1))
        read("SQLALCHEMY_POOL_RECYCLE", "pool_recycle_s", _int_range(-1))
        read("SQLALCHEMY_POOL_TIMEOUT", "pool_timeout_s", _float_range(0.1, MAX_SECONDS))
        read("SQLALCHEMY_POOL_CLASS", "pool_class", _pool_class)
        read("NTORQUE_DB_TIMEOUT", "db_timeout_s", _float_range(0.1, MAX_SECONDS))
        read("NTORQUE_AUTO_MIGRATE", "auto_migrate", _bool)
        read("NTORQUE_MAX_BODY_BYTES", "max_body_bytes", _int_range(0))
        read("NTORQUE_BODY_TIMEOUT", "body_timeout_s", _float_range(0.1, MAX_SECONDS))
        read("NTORQUE_MAX_URL_LENGTH", "max_url_length", _int_range(16, 65536))
        read("NTORQUE_MAX_PASSTHROUGH_HEADERS", "max_passthrough_headers", _int_range(0, 1000))
        read("NTORQUE_WORKER_CONCURRENCY", "worker_concurrency", _int_range(1, 10_000))
        read("NTORQUE_POLL_INTERVAL", "poll_interval_s", _float_range(0.01, MAX_SECONDS))
        read("NTORQUE_SHUTDOWN_GRACE", "shutdown_grace_s", _float_range(0, MAX_SECONDS))
        read("NTORQUE_MAX_REDIRECTS", "max_redirects", _int_range(0, 100))
        read("NTORQUE_CA_BUNDLE", "ca_bundle", _existing_file)
        read("NTORQUE_MAX_RESPONSE_BYTES", "max_response_bytes", _int_range(0))
        read("NTORQUE_METRICS_PORT", "metrics_port", _int_range(0, 65535))
        publish_interval = _float_range(0.1, MAX_SECONDS)
        read("NTORQUE_METRICS_PUBLISH_INTERVAL", "metrics_publish_interval_s", publish_interval)
        read("WEB_CONCURRENCY", "web_concurrency", _int_range(1, 256))
        read("FORWARDED_ALLOW_IPS", "forwarded_allow_ips", _trusted_proxies)
        read("NTORQUE_LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error"))
        read("NTORQUE_BOOTSTRAP_APP", "bootstrap_app", _bool)
        if "log_level" in values:
            values["log_level"] = values["log_level"].upper()

        if "max_timeout_s" not in values and values.get("default_timeout_s", 0) > cls.max_timeout_s:
            # Only NTORQUE_DEFAULT_TIMEOUT set (nTorque 0.4 had no maximum): a default above the
            # implicit maximum raises it, rather than stopping a configuration that worked.
            values["max_timeout_s"] = values["default_timeout_s"]
        if "cleanup_interval_s" not in values:
            values["cleanup_interval_s"] = default_cleanup_interval_s(
                values.get("cleanup_after_days", cls.cleanup_after_days),
                values.get("requeue_interval_s", cls.requeue_interval_s),
            )
        settings = cls(**values)
        settings.check()
        if settings.max_due_delay_s < settings.min_due_delay_s:
            # Well defined (the cap wins: every retry waits NTORQUE_MAX_DUE_DELAY), but
            # probably not what was meant.
            logger.warning(
                "NTORQUE_MAX_DUE_DELAY=%g is below NTORQUE_MIN_DUE_DELAY=%g: every retry waits %gs",
                settings.max_due_delay_s,
                settings.min_due_delay_s,
                settings.max_due_delay_s,
            )
        unknown = sorted(k for k in env if k.startswith("NTORQUE_") and k not in KNOWN_VARIABLES)
        for name in unknown:
            logger.warning("unknown configuration variable %s is ignored", name)
        return settings

    def check(self) -> None:
        """Reject combinations that each look valid alone."""
        if self.default_timeout_s > self.max_timeout_s:
            raise SettingsError(
                f"NTORQUE_DEFAULT_TIMEOUT={self.default_timeout_s} is above "
                f"NTORQUE_MAX_TIMEOUT={self.max_timeout_s}"
            )
        if not self.redis_channel:
            raise SettingsError("NTORQUE_REDIS_CHANNEL: must not be empty")

    def replace(self, **changes: Any) -> Settings:
        new = dataclasses.replace(self, **changes)
        new.check()
        return new


def default_cleanup_interval_s(cleanup_after_days: float, requeue_interval_s: float) -> float:
    """How often the clock cleans up when NTORQUE_CLEANUP_INTERVAL is unset.

    Hourly for the usual retention of days; a short retention (``NTORQUE_CLEANUP_AFTER_DAYS=0``:
    delete finished tasks at once) is honoured within 1 % of it, at most every requeue round.
    """
    return min(3600.0, max(requeue_interval_s, cleanup_after_days * 86400 / 100))


def _existing_file(raw: str) -> str:
    path = Path(raw.strip()).expanduser()
    if not path.is_file():
        raise ValueError("no such file")
    return str(path)


KNOWN_VARIABLES = frozenset(
    {
        "NTORQUE_SQLITE_PATH",
        "NTORQUE_BACKOFF",
        "NTORQUE_CLEANUP_AFTER_DAYS",
        "NTORQUE_CLEANUP_INTERVAL",
        "NTORQUE_CLEANUP_BATCH",
        "NTORQUE_DEFAULT_TIMEOUT",
        "NTORQUE_MAX_TIMEOUT",
        "NTORQUE_MIN_DUE_DELAY",
        "NTORQUE_MAX_DUE_DELAY",
        "NTORQUE_MAX_RETRIES",
        "NTORQUE_REQUEUE_INTERVAL",
        "NTORQUE_REQUEUE_BATCH",
        "NTORQUE_NOTIFY_BACKLOG_LIMIT",
        "NTORQUE_TRANSIENT_REQUEST_ERRORS",
        "NTORQUE_AUTHENTICATE",
        "NTORQUE_AUTH_CACHE_SECONDS",
        "NTORQUE_ENABLE_HSTS",
        "NTORQUE_REDIS_CHANNEL",
        "NTORQUE_REDIS_TLS_VERIFY",
        "NTORQUE_DB_TIMEOUT",
        "NTORQUE_AUTO_MIGRATE",
        "NTORQUE_MAX_BODY_BYTES",
        "NTORQUE_BODY_TIMEOUT",
        "NTORQUE_MAX_URL_LENGTH",
        "NTORQUE_MAX_PASSTHROUGH_HEADERS",
        "NTORQUE_WORKER_CONCURRENCY",
        "NTORQUE_POLL_INTERVAL",
        "NTORQUE_SHUTDOWN_GRACE",
        "NTORQUE_MAX_REDIRECTS",
        "NTORQUE_CA_BUNDLE",
        "NTORQUE_MAX_RESPONSE_BYTES",
        "NTORQUE_METRICS_PORT",
        "NTORQUE_METRICS_PUBLISH_INTERVAL",
        "NTORQUE_LOG_LEVEL",
        "NTORQUE_BOOTSTRAP_APP",
        "NTORQUE_URL",  # clients' conventional name for the service's address
    }
)
