"""Group commit: concurrent callers share one transaction without waiting for a timer.

The first caller starts a flush at once; callers arriving while a flush is in flight
queue up and go together in the next one. At low load every batch holds one item and
nothing waits; under load batches grow by themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("ntorque.batching")


class Batcher(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 500,
        concurrency: int = 2,
        name: str = "batch",
        skip_abandoned: bool = False,
    ) -> None:
        self._flush = flush
        # Leave out of a batch the items whose caller gave up (its future cancelled) while
        # they queued: for callers that told their client the item was not taken.
        self._skip_abandoned = skip_abandoned
        self._max_batch = max_batch
        self._concurrency = concurrency
        self._name = name
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._flushers: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        """Add ``item`` to the next batch and wait until that batch is flushed."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if len(self._flushers) < self._concurrency:
            task = asyncio.create_task(self._run(), name=f"{self._name}-flush")
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        # The flush runs in a task of its own: a caller that gives up cancels only its own
        # future, never the flush others share (so no shield, which costs a future more).
        return await future

    async def _run(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            if self._skip_abandoned:
                batch = [entry for entry in batch if not entry[1].done()]
                if not batch:
                    continue
            items = [item for item, _ in batch]
            try:
                results = await self._flush(items)
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def drain(self) -> None:
        """Wait until every submitted item has been flushed."""
        while self._flushers:
            await asyncio.gather(*list(self._flushers), return_exceptions=True)
