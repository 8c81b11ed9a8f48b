"""The worker: wait for a doorbell (or the poll interval), acquire, call hooks, record outcomes."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from opentelemetry import trace

from . import metrics, tracing
from .batching import Batcher
from .constants import COMPLETED, FAILED, PENDING
from .hooks import HookClient, HookResult, decide
from .models import Outcome, Task
from .notify import Notifier, NotifyError
from .settings import Settings
from .store import Store, connection_errors, describe

logger = logging.getLogger("ntorque.worker")

# After a database or Redis error, wait this long before trying again.
ERROR_PAUSE_S = 1.0
# An outcome the database cannot take is tried again every ERROR_PAUSE_S until the
# attempt's lease runs out, and at least this many times.
RECORD_ATTEMPTS = 3
# When nearly every slot is busy, wait at most this long for a quarter of them to free up.
SLOT_WAIT_S = 0.005


class Worker:
    def __init__(
        self, settings: Settings, store: Store, notifier: Notifier, hooks: HookClient
    ) -> None:
        self.settings = settings
        self.store = store
        self.notifier = notifier
        self.hooks = hooks
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._recorder: Batcher[Outcome, bool] = Batcher(
            self._flush_outcomes, max_batch=500, concurrency=2, name="record"
        )
        self._notify_error_logged = 0.0
        self._min_batch = max(1, settings.worker_concurrency // 4)
        self._untraced = False
        self._stop_waiter: asyncio.Task[Any] | None = None

    def stop(self) -> None:
        """Stop taking tasks; in-flight hook calls are given the grace period to finish."""
        self._stopping.set()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def run(self, *, burst: bool = False) -> None:
        """Work until :meth:`stop`; with ``burst``, return once nothing is due or running."""
        poll_now = True
        next_poll = 0.0
        # Waits for a free slot also end on stop(): with every slot held by a long call,
        # SIGTERM must still start the grace period at once.
        self._stop_waiter = asyncio.create_task(self._stopping.wait(), name="stop-waiter")
        try:
            while not self._stopping.is_set():
                free = self.settings.worker_concurrency - len(self._inflight)
                if free <= 0:
                    await self._wait_for_a_call()
                    continue
                if free < self._min_batch:
                    free = await self._wait_for_slots()
                ids: list[int] = []
                # Notifications may keep coming for hours under a backlog, while a due
                # task nobody rang (a retry, one stored while Redis was down) waits for
                # the list to run dry: poll the database at least once a poll interval.
                overdue = not poll_now and time.monotonic() >= next_poll
                if not poll_now and not overdue:
                    ids = await self._wait_for_ids(free)
                    if self._stopping.is_set():
                        break
                acquired = await self._acquire(ids, free)
                if not ids:
                    next_poll = time.monotonic() + self.settings.poll_interval_s
                for task in acquired:
                    self._start(task)
                if acquired:
                    # Let the new calls send their requests before this loop spends its
                    # time on the next BLMPOP: the hook call is on the latency path.
                    await asyncio.sleep(0)
                # A full poll means more are probably due: poll again before waiting. Not
                # after an overdue one: the notifications that kept coming ring for those.
                poll_now = not ids and not overdue and len(acquired) >= free
                if burst and not acquired and not ids:
                    if not self._inflight:
                        break
                    await self._wait_for_a_call()
                    poll_now = True
        finally:
            self._stop_waiter.cancel()
            await self._shutdown()

    async def _wait_for_a_call(self) -> None:
        """Until a hook call in flight finishes, or :meth:`stop` is called."""
        waiters: set[asyncio.Future[Any]] = set(self._inflight)
        if self._stop_waiter is not None:
            waiters.add(self._stop_waiter)
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)

    async def _wait_for_slots(self) -> int:
        """Nearly saturated: let a few more calls finish, briefly, so one acquire serves many.

        Refilling one slot at a time costs a Redis round trip and a database statement per
        task; at low load there are free slots and nothing waits here.
        """
        deadline = time.monotonic() + SLOT_WAIT_S
        while self._inflight and not self._stopping.is_set():
            free = self.settings.worker_concurrency - len(self._inflight)
            remaining = deadline - time.monotonic()
            if free >= self._min_batch or remaining <= 0:
                break
            await asyncio.wait(
                self._inflight, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        return self.settings.worker_concurrency - len(self._inflight)

    async def _wait_for_ids(self, free: int) -> list[int]:
        if not self.notifier.available():
            # The channel failed moments ago: poll the database until it may be back.
            await self._pause(self.settings.poll_interval_s)
            return []
        try:
            return await self.notifier.wait(free, self.settings.poll_interval_s)
        except NotifyError as exc:
            metrics.NOTIFY_FAILURES.labels(role="worker").inc()
            now = time.monotonic()
            if now - self._notify_error_logged > 30:
                logger.warning("notification channel unavailable, polling the database: %s", exc)
                self._notify_error_logged = now
            await self._pause(min(ERROR_PAUSE_S, self.settings.poll_interval_s))
            return []

    async def _acquire(self, ids: list[int], free: int) -> list[Task]:
        started = time.perf_counter()
        start_ns = time.time_ns()
        try:
            if ids:
                acquired = await self.store.acquire(ids)
            else:
                acquired = await self.store.acquire_due(free)
        except connection_errors() as exc:
            metrics.DATABASE_ERRORS.labels(role="worker").inc()
            logger.error("acquire failed, database unavailable: %s", describe(exc))
            await self._pause(ERROR_PAUSE_S)
            return []
        metrics.ACQUIRE_SECONDS.observe(time.perf_counter() - started)
        end_ns = time.time_ns()
        if acquired:
            metrics.TASKS_ACQUIRED.inc(len(acquired))
        if ids:
            misses = len(set(ids)) - len(acquired)
            if misses > 0:
                metrics.ACQUIRE_MISSES.inc(misses)
        # Checked once per batch: the provider lookup reads os.environ each time.
        self._untraced = tracing.off()
        if self._untraced:
            return acquired
        for task in acquired:
            # One acquire statement serves many tasks, each in its own trace: give each
            # trace a span covering the shared statement.
            span = tracing.tracer.start_span(
                "acquire",
                context=tracing.stored_context(task.trace_context),
                start_time=start_ns,
                attributes=_task_attributes(task),
            )
            span.end(end_time=end_ns)
        return acquired

    def _start(self, task: Task) -> None:
        job = asyncio.create_task(self._perform(task), name=f"hook-{task.id}")
        self._inflight.add(job)
        job.add_done_callback(self._inflight.discard)

    async def _perform(self, task: Task) -> None:
        metrics.HOOKS_IN_FLIGHT.inc()
        try:
            result = await self._call(task)
        finally:
            metrics.HOOKS_IN_FLIGHT.dec()
        now = time.time()
        verdict, outcome = decide(task, result, self.settings, now)
        metrics.labelled(
            metrics.HOOK_SECONDS, verdict, metrics.status_class(result.status_code)
        ).observe(result.duration_s)
        metrics.labelled(metrics.ATTEMPTS, verdict).inc()
        logger.debug(
            "action=finish_attempt task_id=%s attempt=%s status_code=%s outcome=%s",
            task.id,
            task.retry_count,
            result.status_code,
            outcome.status,
        )
        # The attempt and its hook call are counted above whatever becomes of the outcome;
        # the task only by the outcome it took. A stale attempt's outcome is dropped, and
        # the attempt that does hold the task (or the clock, failing it) counts the task.
        if not await self._record(outcome, lease_end=task.due):
            return
        if outcome.status == PENDING:
            metrics.RETRIES.inc()
            return
        if outcome.status == COMPLETED:
            metrics.TASKS_COMPLETED.inc()
        elif outcome.status == FAILED:
            metrics.TASKS_FAILED.inc()
        metrics.labelled(metrics.TASK_SECONDS, outcome.status.lower()).observe(
            max(now - task.created, 0.0)
        )

    async def _call(self, task: Task) -> HookResult:
        if self._untraced:
            # No span to record: skip the no-op span machinery and send the stored context.
            return await self.hooks.call(task, tracing.stored_headers(task.trace_context))
        with tracing.tracer.start_as_current_span(
            "hook",
            context=tracing.stored_context(task.trace_context),
            kind=trace.SpanKind.CLIENT,
            attributes=_task_attributes(task),
        ) as span:
            result = await self.hooks.call(task, tracing.outgoing_headers())
            if result.status_code is not None:
                span.set_attribute("http.response.status_code", result.status_code)
            if result.error is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, result.error))
            return result

    async def _record(self, outcome: Outcome, lease_end: float) -> bool:
        """Write ``outcome``, retrying while the database is unavailable, until the lease ends.

        Returns whether the task took it: False for a stale attempt's outcome, or one given
        up on. A PostgreSQL restart or failover takes longer than a few tries: given up on,
        the outcome would be lost, the hook called again, and a last attempt that succeeded
        failed by the clock when its lease ran out.
        """
        tries = 0
        while True:
            tries += 1
            try:
                recorded = await self._recorder.submit(outcome)
            except connection_errors() as exc:
                metrics.DATABASE_ERRORS.labels(role="worker").inc()
                if tries == 1:
                    logger.error(
                        "action=record_outcome task_id=%s failed, retrying until the lease"
                        " ends: %s",
                        outcome.task_id,
                        describe(exc),
                    )
            else:
                if not recorded and tries > 1 and time.time() < lease_end:
                    # A failed try may have committed before its connection broke: the
                    # write went through, only the answer was lost. Until the lease ends
                    # nothing but this attempt's own write can move its task on (no one may
                    # acquire or fail it before then), so "not taken" then means taken by
                    # an earlier try: counted, or no one would ever count this task. An
                    # answer after the lease is ambiguous and stays stale: a lost answer
                    # needs the connection to break between commit and reply, a statement
                    # that never reached the database is the usual failure, and then the
                    # newer attempt or the clock counts the task: counting it here as well
                    # would count it twice.
                    recorded = True
                if not recorded:
                    metrics.STALE_OUTCOMES.inc()
                    logger.debug(
                        "action=record_outcome task_id=%s attempt=%s stale: dropped",
                        outcome.task_id,
                        outcome.attempt,
                    )
                return recorded
            if tries >= RECORD_ATTEMPTS and time.time() + ERROR_PAUSE_S >= lease_end:
                break
            await asyncio.sleep(ERROR_PAUSE_S)
        # The lease will run out and the task will be tried again: at least once holds.
        logger.error("action=record_outcome task_id=%s gave up (try %d)", outcome.task_id, tries)
        return False

    async def _flush_outcomes(self, outcomes: list[Outcome]) -> list[bool]:
        return await self.store.record(outcomes)

    async def _pause(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            pass

    async def _shutdown(self) -> None:
        if self._inflight:
            logger.info(
                "stopping: waiting up to %gs for %d hook calls",
                self.settings.shutdown_grace_s,
                len(self._inflight),
            )
            _, pending = await asyncio.wait(
                list(self._inflight), timeout=self.settings.shutdown_grace_s
            )
            for job in pending:
                job.cancel()
            if pending:
                logger.warning("%d hook calls cut short; they will be retried", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        await self._recorder.drain()


def _task_attributes(task: Task) -> dict[str, str | int]:
    from urllib.parse import urlsplit

    return {
        "ntorque.task.id": task.id,
        "ntorque.task.attempt": task.retry_count,
        "http.request.method": task.method,
        "server.address": urlsplit(task.url).hostname or "",
    }
