"""Group commit: concurrent submits share a flush; a lone submit flushes at once (no timer)."""

from __future__ import annotations

import asyncio

import pytest

from ntorque.batching import Batcher


class Recorder:
    """A flush function that records batches and can be held shut by a gate."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_on: int | None = None

    async def flush(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("flush failed")
        return [i * 10 for i in items]


async def spin(turns: int = 5) -> None:
    """Let the loop run a few turns (no wall-clock waiting)."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_a_single_submit_flushes_at_once() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher: Batcher[int, int] = Batcher(rec.flush, concurrency=1)
    pending = asyncio.create_task(batcher.submit(1))
    await spin()
    # Flushing began within a few loop turns, alone: nothing waited for company.
    assert rec.batches == [[1]]
    rec.gate.set()
    assert await pending == 10


async def test_concurrent_submits_share_the_next_flush() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher: Batcher[int, int] = Batcher(rec.flush, concurrency=1, max_batch=100)
    first = asyncio.create_task(batcher.submit(0))
    await spin()
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 31)]
    await spin()
    assert rec.batches == [[0]], "while a flush runs, the others queue"
    rec.gate.set()
    results = await asyncio.gather(first, *rest)
    assert results == [i * 10 for i in range(31)]
    assert [len(b) for b in rec.batches] == [1, 30]


async def test_batches_respect_max_batch() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher: Batcher[int, int] = Batcher(rec.flush, concurrency=1, max_batch=10)
    first = asyncio.create_task(batcher.submit(0))
    await spin()
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 26)]
    rec.gate.set()
    await asyncio.gather(first, *rest)
    assert [len(b) for b in rec.batches] == [1, 10, 10, 5]
    assert sorted(i for b in rec.batches for i in b) == list(range(26))


async def test_concurrency_two_runs_two_flushes() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher: Batcher[int, int] = Batcher(rec.flush, concurrency=2)
    jobs = []
    for i in range(2):
        jobs.append(asyncio.create_task(batcher.submit(i)))
        await spin()
    # The second submit did not wait for the first flush: a second flusher took it.
    assert rec.batches == [[0], [1]]
    rec.gate.set()
    assert await asyncio.gather(*jobs) == [0, 10]


async def test_a_failed_flush_fails_its_batch_only() -> None:
    rec = Recorder()
    rec.gate.clear()
    rec.fail_on = 3
    batcher: Batcher[int, int] = Batcher(rec.flush, concurrency=1)
    first = asyncio.create_task(batcher.submit(0))
    await spin()
    doomed = [asyncio.create_task(batcher.submit(i)) for i in (3, 4)]
    rec.gate.set()
    assert await first == 0
    for job in doomed:
        with pytest.raises(RuntimeError):
            await job
    assert await batcher.submit(5) == 50, "the batcher keeps working after a failure"


async def test_a_cancelled_caller_does_not_cancel_the_shared_flush() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher: Batcher[int, int] = Batcher(rec.flush, concurrency=1)
    first = asyncio.create_task(batcher.submit(0))
    await spin()
    quitter = asyncio.create_task(batcher.submit(1))
    stayer = asyncio.create_task(batcher.submit(2))
    await spin()
    quitter.cancel()
    rec.gate.set()
    assert await first == 0
    assert await stayer == 20
    await batcher.drain()
    assert [1, 2] in rec.batches, "the cancelled caller's item was still flushed"


async def test_with_skip_abandoned_an_item_given_up_while_queued_is_not_flushed() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher: Batcher[int, int] = Batcher(rec.flush, concurrency=1, skip_abandoned=True)
    first = asyncio.create_task(batcher.submit(0))
    await spin()
    quitter = asyncio.create_task(batcher.submit(1))
    stayer = asyncio.create_task(batcher.submit(2))
    alone = asyncio.create_task(batcher.submit(3))
    await spin()
    quitter.cancel()
    rec.gate.set()
    assert await first == 0
    assert await stayer == 20
    assert await alone == 30
    await batcher.drain()
    assert rec.batches == [[0], [2, 3]], "the item given up while queued was flushed"
