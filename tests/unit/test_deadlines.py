"""Swept deadlines: an overrun is a TimeoutError, a cancellation from elsewhere stays one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from ntorque.deadlines import Deadlines


@pytest.fixture
async def deadlines() -> AsyncIterator[Deadlines]:
    d = Deadlines(resolution=0.01)
    yield d
    await d.close()


async def test_an_overrun_raises_timeout_error_soon_after_the_deadline(
    deadlines: Deadlines,
) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadlines(0.1):
            await asyncio.sleep(5)
    waited = time.monotonic() - started
    assert 0.1 <= waited < 1.0
    # The task carries no cancellation left over: it can go on awaiting.
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.02)


async def test_a_block_within_its_deadline_is_left_alone(deadlines: Deadlines) -> None:
    async with deadlines(0.5) as deadline:
        await asyncio.sleep(0.05)
    assert not deadline.expired
    # Left behind: nothing of it stays registered to cancel the task later.
    await asyncio.sleep(0.6)


async def test_an_outside_cancellation_is_not_turned_into_a_timeout(
    deadlines: Deadlines,
) -> None:
    async def wait() -> None:
        async with deadlines(5):
            await asyncio.sleep(5)

    task = asyncio.create_task(wait())
    await asyncio.sleep(0.03)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_outside_cancellation_during_an_overrun_stays_a_cancellation(
    deadlines: Deadlines,
) -> None:
    async def wait() -> None:
        async with deadlines(0.05):
            try:
                await asyncio.sleep(5)
            finally:
                # Cancelled by the deadline; another cancellation arrives meanwhile.
                asyncio.current_task().cancel()  # type: ignore[union-attr]
                await asyncio.sleep(0)

    task = asyncio.create_task(wait())
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)


async def test_concurrent_deadlines_expire_independently(deadlines: Deadlines) -> None:
    async def wait(limit: float, sleep: float) -> str:
        try:
            async with deadlines(limit):
                await asyncio.sleep(sleep)
        except TimeoutError:
            return "timeout"
        return "done"

    results = await asyncio.gather(wait(0.05, 2), wait(2, 0.1), wait(0.1, 2))
    assert results == ["timeout", "done", "timeout"]


async def test_close_stops_the_sweeper_and_a_new_deadline_starts_it_again() -> None:
    d = Deadlines(resolution=0.01)
    async with d(1):
        pass
    await d.close()
    with pytest.raises(TimeoutError):
        async with d(0.05):
            await asyncio.sleep(2)
    await d.close()
