"""The clock: re-ring for due tasks, fail exhausted ones, delete old finished ones.

Safe to run more than once: requeue only rings (acquire decides), and the bound on the
channel is checked in Redis as each batch is rung, so clocks ringing at once never fill it
past NTORQUE_NOTIFY_BACKLOG_LIMIT, nor past the number of due tasks, together;
fail_exhausted fails (and counts) each task in one clock only; cleanup deletes in batches
that skip rows another clock holds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from . import metrics
from .notify import Notifier, NotifyError
from .settings import Settings
from .store import Backlog, Store, connection_errors, describe

logger = logging.getLogger("ntorque.clock")

T = TypeVar("T")


class Clock:
    def __init__(self, settings: Settings, store: Store, notifier: Notifier) -> None:
        self.settings = settings
        self.store = store
        self.notifier = notifier
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        next_cleanup = 0.0
        while not self._stopping.is_set():
            await self.tick()
            if time.monotonic() >= next_cleanup:
                await self._guarded("cleanup", self.cleanup)
                next_cleanup = time.monotonic() + self.settings.cleanup_interval_s
            try:
                async with asyncio.timeout(self.settings.requeue_interval_s):
                    await self._stopping.wait()
            except TimeoutError:
                pass

    async def tick(self) -> None:
        """One requeue round plus the backlog gauges."""
        await self._guarded("fail_exhausted", self.fail_exhausted)
        backlog = await self._guarded("backlog", self.measure_backlog)
        if backlog is not None:  # else the database is down, and logged as such
            await self._guarded("requeue", functools.partial(self.requeue, backlog.due))

    async def _guarded(self, action: str, step: Callable[[], Awaitable[T]]) -> T | None:
        try:
            return await step()
        except connection_errors() as exc:
            metrics.DATABASE_ERRORS.labels(role="clock").inc()
            logger.error("action=%s failed, database unavailable: %s", action, describe(exc))
            return None

    async def requeue(self, due: int | None = None) -> int:
        """Ring for due tasks in due order, never filling the channel past its bound.

        Nor past the number of tasks due (``due``; counted when not given): with workers
        stopped, every round would otherwise ring the same waiting tasks again, and the
        list would fill with their duplicates up to the bound.
        """
        if not self.notifier.rings or not self.notifier.available():
            return 0  # no channel, or it failed moments ago: its pause first
        if due is None:
            due = (await self.store.backlog()).due
        bound = min(self.settings.notify_backlog_limit, due)
        try:
            room = bound - await self.notifier.pending()
        except NotifyError as exc:
            metrics.NOTIFY_FAILURES.labels(role="clock").inc()
            logger.warning("action=requeue skipped, notification channel unavailable: %s", exc)
            return 0
        rung = 0
        after: tuple[float, int] | None = None
        now = time.time()
        while room > 0:
            limit = min(self.settings.requeue_batch, room)
            batch = await self.store.due_ids(limit, now=now, after=after)
            if not batch:
                break
            try:
                # Bounded in the channel itself: other clocks may be ringing at this moment.
                pushed = await self.notifier.notify_upto([task_id for _, task_id in batch], bound)
            except NotifyError as exc:
                metrics.NOTIFY_FAILURES.labels(role="clock").inc()
                logger.warning("action=requeue stopped, notification channel down: %s", exc)
                break
            rung += pushed
            room -= pushed
            after = batch[-1]
            if pushed < len(batch) or len(batch) < limit:
                break
        if rung:
            metrics.REQUEUED.inc(rung)
            logger.info("action=requeue count=%d", rung)
        return rung

    async def fail_exhausted(self) -> int:
        created = await self.store.fail_exhausted()
        if created:
            metrics.EXHAUSTED.inc(len(created))
            metrics.TASKS_FAILED.inc(len(created))
            # The slowest failures of all: left out, the failed tasks' latency would read low.
            now = time.time()
            duration = metrics.labelled(metrics.TASK_SECONDS, "failed")
            for at in created:
                duration.observe(max(now - at, 0.0))
            logger.info("action=fail_exhausted count=%d", len(created))
        return len(created)

    async def cleanup(self) -> int:
        """Delete finished tasks older than NTORQUE_CLEANUP_AFTER_DAYS, batch by batch."""
        older_than = time.time() - self.settings.cleanup_after_days * 86400
        deleted = 0
        while not self._stopping.is_set():
            count = await self.store.cleanup(older_than, self.settings.cleanup_batch)
            deleted += count
            if count < self.settings.cleanup_batch:
                break
        if deleted:
            metrics.CLEANED_UP.inc(deleted)
            logger.info("action=cleanup count=%d", deleted)
        return deleted

    async def measure_backlog(self) -> Backlog:
        backlog = await self.store.backlog()
        metrics.DUE_TASKS.set(backlog.due)
        metrics.OLDEST_DUE_AGE.set(backlog.oldest_due_age_s)
        return backlog
