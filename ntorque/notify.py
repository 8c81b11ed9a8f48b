"""The doorbell: tell workers which tasks to look at. A hint only; the database decides.

Three backends share one interface: Redis (``RPUSH``/``BLPOP`` on ``NTORQUE_REDIS_CHANNEL``),
in-process (all roles in one process, no Redis) and none (separate processes, no Redis:
workers find tasks by polling the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from redis import asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from .settings import Settings

logger = logging.getLogger("ntorque.notify")


class NotifyError(Exception):
    """The notification channel is unavailable."""


# A Redis call other than a blocking wait that gets no answer this soon has failed: Redis
# answers them at once.
CALL_TIMEOUT_S = 1.0
# After a failed call the notifier reports itself unavailable this long. Its callers skip it
# (the web's ring, the clock's requeue) or poll the database instead (workers), rather than
# wait on a Redis that may never answer: a black hole then costs one timeout per pause.
PAUSE_AFTER_FAILURE_S = 5.0


class Notifier(Protocol):
    kind: str
    # Whether ringing reaches workers at all (False: they find due tasks by polling).
    rings: bool

    async def notify(self, ids: Sequence[int]) -> None:
        """Ring for ``ids``; raise :class:`NotifyError` if the channel is down.

        Ids that would take the channel past ``NTORQUE_NOTIFY_BACKLOG_LIMIT`` are dropped:
        with workers stopped it would otherwise hold one id per waiting task, however many.
        Workers find those tasks by polling, the clock rings them once there is room.
        """

    async def notify_upto(self, ids: Sequence[int], limit: int) -> int:
        """Ring for the first of ``ids`` while fewer than ``limit`` wait; how many were rung.

        Checking the length and ringing are one step, so clocks ringing at once cannot
        together fill the channel past ``limit``.
        """

    async def wait(self, max_items: int, timeout_s: float) -> list[int]:
        """Up to ``max_items`` ids, waiting at most ``timeout_s`` for the first; [] if none."""

    async def pending(self) -> int:
        """How many notifications wait to be taken."""

    def available(self) -> bool:
        """False for a while after the channel failed: skip it, or poll the database."""

    async def close(self) -> None: ...


def redis_client(settings: Settings, **kwargs: Any) -> aioredis.Redis:
    """A Redis client for ``REDIS_URL``; Heroku's ``rediss://`` uses self-signed certificates."""
    assert settings.redis_url is not None
    options: dict[str, Any] = {
        "socket_connect_timeout": 2,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }
    if settings.redis_url.startswith("rediss://") and not settings.redis_tls_verify:
        options["ssl_cert_reqs"] = None
    options.update(kwargs)
    return aioredis.Redis.from_url(settings.redis_url, **options)


# RPUSH the ids ARGV[2..] while the list is shorter than ARGV[1]; how many were pushed.
# Atomic in Redis, unlike LLEN then RPUSH from the client. Pushed in slices: Lua's unpack
# takes a few thousand values at most.
_RPUSH_UPTO = """
local n = math.min(tonumber(ARGV[1]) - redis.call('LLEN', KEYS[1]), #ARGV - 1)
local i = 2
while i <= n + 1 do
  local j = math.min(i + 999, n + 1)
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, j))
  i = j + 1
end
return math.max(n, 0)
"""


class RedisNotifier:
    kind = "redis"
    rings = True

    def __init__(self, settings: Settings) -> None:
        self.channel = settings.redis_channel
        self.limit = settings.notify_backlog_limit
        # Set once a push found the list past the limit. Until a push fits again, pushes go
        # through the script that checks for room first; below the limit a plain RPUSH does,
        # the cheapest call on the enqueue path.
        self._full = False
        self._client = redis_client(settings, socket_timeout=5)
        # BLPOP holds its connection for the whole wait: keep it off the client's pool.
        self._blocking = redis_client(settings, socket_timeout=None)
        self._blmpop = True
        self._rpush_upto = self._client.register_script(_RPUSH_UPTO)
        self._unavailable_until = 0.0

    def available(self) -> bool:
        return time.monotonic() >= self._unavailable_until

    @contextlib.asynccontextmanager
    async def _call(self, timeout_s: float) -> AsyncIterator[None]:
        """Bound a Redis call; a failure becomes NotifyError and starts the pause."""
        try:
            async with asyncio.timeout(timeout_s):
                yield
        except (RedisError, OSError, TimeoutError) as exc:
            self._unavailable_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
            raise NotifyError(str(exc) or f"no answer within {timeout_s:g} s") from exc

    async def notify(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        async with self._call(CALL_TIMEOUT_S):
            if self._full:
                pushed = await self._rpush_upto(keys=[self.channel], args=[self.limit, *ids])
                self._full = int(pushed) < len(ids)
                return
            length = int(await self._client.rpush(self.channel, *ids))
            if length > self.limit:
                # Keep the oldest: ids are rung in the order their tasks fell due.
                self._full = True
                await self._client.ltrim(self.channel, 0, self.limit - 1)

    async def notify_upto(self, ids: Sequence[int], limit: int) -> int:
        if not ids:
            return 0
        async with self._call(CALL_TIMEOUT_S):
            return int(await self._rpush_upto(keys=[self.channel], args=[limit, *ids]))

    async def wait(self, max_items: int, timeout_s: float) -> list[int]:
        # Redis answers a blocking pop by its timeout: a second more is only the network.
        async with self._call(timeout_s + 1):
            items = await self._pop(max(max_items, 1), timeout_s)
        return _ids(items)

    async def _pop(self, count: int, timeout_s: float) -> list[Any]:
        if self._blmpop:
            # One round trip for the whole batch (Redis 7): a wake-up is on the latency path.
            try:
                got = await self._blocking.blmpop(
                    timeout_s, 1, self.channel, direction="LEFT", count=count
                )
            except ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self._blmpop = False  # Redis before 7.0: BLPOP, then LPOP the rest
            else:
                return [] if got is None else list(got[1])
        first = await self._blocking.blpop([self.channel], timeout=timeout_s)
        if first is None:
            return []
        items = [first[1]]
        if count > 1:
            more = await self._blocking.lpop(self.channel, count - 1)
            if isinstance(more, list):
                items.extend(more)
        return items

    async def pending(self) -> int:
        async with self._call(CALL_TIMEOUT_S):
            return int(await self._client.llen(self.channel))

    async def close(self) -> None:
        await self._client.aclose()
        await self._blocking.aclose()


class LocalNotifier:
    """In-process doorbell for ``ntorque run`` without Redis. Duplicate ids ring once."""

    kind = "local"
    rings = True

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._ids: dict[int, None] = {}
        self._event = asyncio.Event()

    async def notify(self, ids: Sequence[int]) -> None:
        await self.notify_upto(ids, self.limit)

    async def notify_upto(self, ids: Sequence[int], limit: int) -> int:
        rung = 0
        for task_id in ids:
            if task_id not in self._ids and len(self._ids) >= limit:
                break
            self._ids[task_id] = None  # already waiting: rung, at no cost
            rung += 1
        if self._ids:
            self._event.set()
        return rung

    async def wait(self, max_items: int, timeout_s: float) -> list[int]:
        if not self._ids:
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._event.wait()
        taken: list[int] = []
        while self._ids and len(taken) < max_items:
            task_id = next(iter(self._ids))
            del self._ids[task_id]
            taken.append(task_id)
        return taken

    async def pending(self) -> int:
        return len(self._ids)

    def available(self) -> bool:
        return True

    async def close(self) -> None:
        self._ids.clear()


class PollingNotifier:
    """No channel at all: ringing does nothing and workers find due tasks by polling."""

    kind = "poll"
    rings = False

    async def notify(self, ids: Sequence[int]) -> None:
        return None

    async def notify_upto(self, ids: Sequence[int], limit: int) -> int:
        return 0

    async def wait(self, max_items: int, timeout_s: float) -> list[int]:
        await asyncio.sleep(timeout_s)
        return []

    async def pending(self) -> int:
        return 0

    def available(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def create_notifier(settings: Settings, *, in_process: bool) -> Notifier:
    """Redis when configured; otherwise in-process if every role shares this process."""
    if settings.redis_url:
        return RedisNotifier(settings)
    if in_process:
        return LocalNotifier(settings.notify_backlog_limit)
    return PollingNotifier()


def _ids(items: Sequence[Any]) -> list[int]:
    ids = []
    for item in items:
        try:
            ids.append(int(item))
        except (TypeError, ValueError):
            logger.warning("ignoring a malformed notification %r", item)
    return ids
