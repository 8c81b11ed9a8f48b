"""Metrics exposition and delivery for every process (web, worker, clock, run).

Three routes get a process's metrics to Prometheus:

* ``web``: ``GET /metrics``. With several uvicorn workers (``WEB_CONCURRENCY`` > 1) the
  workers share prometheus-client's multiprocess directory, so any worker answers for all.
* ``worker`` / ``clock``: their own HTTP port when ``NTORQUE_METRICS_PORT`` is set.
* Heroku, where only web dynos take traffic: with ``REDIS_URL`` set, every process
  publishes its exposition to Redis every ``NTORQUE_METRICS_PUBLISH_INTERVAL`` seconds
  under a key that expires, and ``GET /metrics/cluster`` on any web dyno serves them all,
  each sample labelled with its ``dyno``. A dead dyno's key expires: nothing grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from . import metrics
from .constants import METRICS_KEY_SUFFIX
from .settings import Settings

logger = logging.getLogger("ntorque.observe")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set by the web master for its uvicorn workers: they publish as one instance, not N.
INSTANCE_ENV = "_NTORQUE_METRICS_INSTANCE"
# How often the uvicorn workers refresh their process_* gauges in multiprocess mode.
PROCESS_STATS_INTERVAL_S = 5.0
# prometheus-client's files of gauges that count only while their process lives.
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")

# The role whose families this process exports; None (tests, bare create_app): all.
_role: str | None = None


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def instance_name() -> str:
    """This process's name in the cluster view: Heroku's ``$DYNO``, else host-pid."""
    return (
        os.environ.get("DYNO")
        or os.environ.get(INSTANCE_ENV)
        or f"{socket.gethostname()}-{os.getpid()}"
    )


class _RoleView(Collector):
    """The families of ``source`` that ``role`` owns (see metrics.ROLE_FAMILIES)."""

    def __init__(self, source: Collector, role: str | None) -> None:
        self.source = source
        self.role = role

    def collect(self) -> Iterable[Metric]:
        for family in self.source.collect():
            if self.role is None or metrics.exported_by(self.role, family.name):
                yield family


def _source() -> Collector:
    if multiprocess():
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def exposition() -> tuple[bytes, str]:
    """This process's metrics (all uvicorn workers' in multiprocess mode), text format."""
    return generate_latest(_RoleView(_source(), _role)), CONTENT_TYPE_LATEST


# -- web: several uvicorn workers -----------------------------------------------------------


def prepare_web_workers(settings: Settings) -> None:
    """Before uvicorn forks: a fresh multiprocess directory when there are several workers."""
    os.environ.setdefault(INSTANCE_ENV, instance_name())
    if settings.web_concurrency <= 1 or settings.development:
        return
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        # Files of a previous run would add its counts to ours: start from empty.
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):
            if name.endswith(".db"):
                os.unlink(os.path.join(given, name))
        return
    directory = tempfile.mkdtemp(prefix="ntorque-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    import atexit

    atexit.register(shutil.rmtree, directory, True)


class _ProcessStats:
    """process_* metrics per uvicorn worker (pid label); multiprocess mode drops the usual ones."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        def gauge(name: str, doc: str) -> Gauge:
            # registry=None: the multiprocess files are the registry; REGISTRY has these names.
            return Gauge(name, doc, registry=None, multiprocess_mode="liveall")

        self.gauges = {
            "process_resident_memory_bytes": gauge(
                "process_resident_memory_bytes", "Resident memory size in bytes."
            ),
            "process_open_fds": gauge("process_open_fds", "Number of open file descriptors."),
            "process_start_time_seconds": gauge(
                "process_start_time_seconds", "Start time of the process since the epoch."
            ),
        }
        # A counter, as elsewhere (same type in the cluster view); per pid, advanced by deltas.
        self.cpu = Counter(
            "process_cpu_seconds",
            "Total user and system CPU time, seconds.",
            ["pid"],
            registry=None,
        ).labels(pid=str(os.getpid()))
        self._cpu_seen = 0.0

    def update(self) -> None:
        from prometheus_client import ProcessCollector

        values = {
            s.name: s.value
            for family in ProcessCollector(registry=None).collect()
            for s in family.samples
        }
        for name, gauge in self.gauges.items():
            if name in values:
                gauge.set(values[name])
        cpu = values.get("process_cpu_seconds_total")
        if cpu is not None and cpu > self._cpu_seen:
            self.cpu.inc(cpu - self._cpu_seen)
            self._cpu_seen = cpu
        _forget_dead_workers()


def _forget_dead_workers() -> None:
    """Drop the live gauges of uvicorn workers that died without a clean stop.

    uvicorn replaces a crashed worker; without this, its last memory, file descriptors and
    start time would stay in /metrics, under its pid, until the web process restarts.
    """
    from prometheus_client import multiprocess as mp

    directory = os.environ.get(MULTIPROC_ENV, "")
    dead: set[int] = set()
    for name in os.listdir(directory):
        match = _LIVE_GAUGE_FILE.fullmatch(name)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.add(pid)
        except PermissionError:
            pass  # alive, someone else's
    for pid in dead:
        mp.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


class WebMetrics:
    """ASGI wrapper for ``ntorque web``: per-process metrics tied to the app's lifespan."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._handle: MetricsHandle | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def wrapped_receive() -> Any:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._handle = await start_process_metrics(self.settings, "web")
            elif message["type"] == "lifespan.shutdown" and self._handle is not None:
                await stop_process_metrics(self._handle)
                self._handle = None
            return message

        await self.app(scope, wrapped_receive, send)


# -- every long-running process ------------------------------------------------------------


@dataclass
class MetricsHandle:
    role: str
    server: Any = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    publisher: Publisher | None = None


async def start_process_metrics(settings: Settings, role: str) -> MetricsHandle:
    """Announce this process, serve NTORQUE_METRICS_PORT and publish to Redis as configured."""
    global _role
    _role = role
    metrics.announce(role)
    handle = MetricsHandle(role=role)
    if settings.metrics_port is not None and role != "web":
        from prometheus_client import start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_RoleView(REGISTRY, role))
        try:
            handle.server, _ = start_http_server(settings.metrics_port, registry=registry)
        except OSError as exc:
            # Typically another process holds the port: one line naming the variable.
            raise SystemExit(
                f"ntorque: NTORQUE_METRICS_PORT={settings.metrics_port}: cannot serve metrics"
                f" there: {exc.strerror or exc}"
            ) from None
        logger.info("metrics: serving on port %d", settings.metrics_port)
    if role == "web" and multiprocess():
        stats = _ProcessStats()
        handle.tasks.append(asyncio.create_task(_every(stats.update), name="process-stats"))
    if settings.redis_url:
        handle.publisher = Publisher(settings, role)
        handle.tasks.append(asyncio.create_task(handle.publisher.run(), name="metrics-publish"))
    return handle


async def stop_process_metrics(handle: MetricsHandle | None) -> None:
    if handle is None:
        return
    if handle.publisher is not None:
        # Let a publication in flight finish rather than cancel it: a cancelled MULTI/EXEC
        # already on the wire could land after the withdrawal and leave the entry behind.
        handle.publisher.stop()
    for task in handle.tasks:
        if handle.publisher is None or task.get_name() != "metrics-publish":
            task.cancel()
    for task in handle.tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            async with asyncio.timeout(5):
                await task
    if handle.publisher is not None:
        await handle.publisher.withdraw()
    if handle.server is not None:
        handle.server.shutdown()
        handle.server.server_close()
    if handle.role == "web" and multiprocess():
        from prometheus_client import multiprocess as mp

        mp.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


async def _every(step: Any, interval_s: float = PROCESS_STATS_INTERVAL_S) -> None:
    while True:
        step()
        await asyncio.sleep(interval_s)


# -- the Heroku route: publish to Redis, serve at /metrics/cluster -------------------------


def index_key(settings: Settings) -> str:
    """Sorted set of publishing instances, scored by when their entry expires."""
    return settings.redis_channel + METRICS_KEY_SUFFIX


def publish_ttl_s(settings: Settings) -> float:
    # Three missed publications before a live process drops out of the cluster view.
    return 3 * settings.metrics_publish_interval_s + 1


# Publish unless the entry under this name is a newer process's: the old and the new
# process of a restarted dyno would otherwise take turns, and each turn back to the old,
# higher counts reads to rate() as a counter reset, adding the old totals once more.
# KEYS: entry, index. ARGV: entry, ttl_ms, started, instance, now, expires_at.
_PUBLISH_LUA = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, entry = pcall(cjson.decode, current)
  if ok and type(entry) == 'table' and tonumber(entry.started)
      and tonumber(entry.started) > tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""
# Withdraw only this process's own entry, never the one of its successor under the name.
# KEYS: entry, index. ARGV: process, instance.
_WITHDRAW_LUA = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, entry = pcall(cjson.decode, current)
  if ok and type(entry) == 'table' and entry.process ~= nil and entry.process ~= ARGV[1] then
    return 0
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""


class Publisher:
    """Writes this process's exposition to Redis every NTORQUE_METRICS_PUBLISH_INTERVAL.

    A dyno restarted under the same name supersedes its old process in the cluster view as
    soon as it publishes: counters go back once (a reset rate() handles), not to and fro.
    """

    def __init__(self, settings: Settings, role: str) -> None:
        from .notify import redis_client

        self.settings = settings
        self.role = role
        self.instance = instance_name()
        self.index = index_key(settings)
        self.key = f"{self.index}:{self.instance}"
        # Who wrote an entry and when it started: a restarted dyno keeps its name, and
        # for a while the old process (its grace period, preboot) runs beside the new one.
        self.started = time.time()
        self.process = f"{socket.gethostname()}-{os.getpid()}-{self.started!r}"
        self._client = redis_client(settings, socket_timeout=5)
        self._publish = self._client.register_script(_PUBLISH_LUA)
        self._withdraw = self._client.register_script(_WITHDRAW_LUA)
        self._failing = False
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Finish the publication in flight, if any, and publish no more."""
        self._stopping.set()

    async def publish_once(self) -> None:
        body, _ = exposition()
        ttl = publish_ttl_s(self.settings)
        now = time.time()
        entry = {
            "instance": self.instance,
            "role": self.role,
            "at": now,
            "started": self.started,
            "process": self.process,
            "text": body.decode(),
        }
        await self._publish(
            keys=[self.key, self.index],
            args=[json.dumps(entry), int(ttl * 1000), self.started, self.instance, now, now + ttl],
        )

    async def run(self) -> None:
        from redis.exceptions import RedisError

        while not self._stopping.is_set():
            try:
                await self.publish_once()
                self._failing = False
            except (RedisError, OSError) as exc:
                if not self._failing:
                    logger.warning("metrics: could not publish to Redis: %s", exc)
                self._failing = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.metrics_publish_interval_s):
                    await self._stopping.wait()

    async def withdraw(self) -> None:
        """Leave the cluster view at once on a clean stop (a crash waits for the TTL)."""
        from redis.exceptions import RedisError

        with contextlib.suppress(RedisError, OSError):
            async with asyncio.timeout(2):
                await self._withdraw(
                    keys=[self.key, self.index], args=[self.process, self.instance]
                )
        await self._client.aclose()


class MetricsUnavailable(Exception):
    """The published metrics cannot be read: Redis is unreachable or did not answer."""


# How long a scrape of /metrics/cluster may wait for Redis in all.
CLUSTER_READ_TIMEOUT_S = 5.0


async def cluster_exposition(settings: Settings) -> tuple[bytes, str]:
    """Every live process's published metrics, each sample labelled with its ``dyno``.

    Without Redis there is nothing to collect from; this process (``ntorque run`` holds
    every role) answers for itself, labelled the same way.
    """
    from redis.exceptions import RedisError

    entries: list[dict[str, Any]] = []
    if settings.redis_url:
        try:
            async with asyncio.timeout(CLUSTER_READ_TIMEOUT_S):
                entries = await _read_entries(settings)
        except (RedisError, OSError, TimeoutError) as exc:
            raise MetricsUnavailable(str(exc) or type(exc).__name__) from exc
    else:
        body, _ = exposition()
        entries = [{"instance": instance_name(), "text": body.decode()}]
    return generate_latest(_Merged(entries)), CONTENT_TYPE_LATEST


async def _read_entries(settings: Settings) -> list[dict[str, Any]]:
    from .notify import redis_client

    index = index_key(settings)
    client = redis_client(settings, socket_timeout=5)
    try:
        now = time.time()
        await client.zremrangebyscore(index, "-inf", now)
        names = [
            n.decode() if isinstance(n, bytes) else str(n)
            for n in await client.zrange(index, 0, -1)
        ]
        raw = await client.mget([f"{index}:{name}" for name in names]) if names else []
    finally:
        await client.aclose()
    entries = []
    for item in raw:
        if item is None:
            continue  # expired between ZRANGE and MGET
        with contextlib.suppress(ValueError, TypeError):
            entry = json.loads(item)
            if isinstance(entry, dict) and isinstance(entry.get("text"), str):
                entries.append(entry)
    return entries


class _Merged(Collector):
    """Families of several expositions merged by name, each sample given a ``dyno`` label."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.entries = entries

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for entry in sorted(self.entries, key=lambda e: str(e.get("instance"))):
            dyno = str(entry.get("instance", "unknown"))
            try:
                parsed = list(text_string_to_metric_families(entry["text"]))
            except ValueError as exc:
                logger.warning("metrics: unreadable entry from %s: %s", dyno, exc)
                continue
            for family in parsed:
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                elif merged.type != family.type:
                    continue
                for sample in family.samples:
                    labels = {**sample.labels, "dyno": dyno}
                    merged.add_sample(sample.name, labels, sample.value, sample.timestamp)
        yield from families.values()
