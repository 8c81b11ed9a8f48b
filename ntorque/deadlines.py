"""Request deadlines checked by one sweeper, instead of a timer per request.

``asyncio.timeout`` arms and cancels an event-loop timer on every use: about 2-4 us, twice
per enqueue (body read, database wait), some 5 % of the web's CPU per task (bench A). The
web's deadlines are seconds long and need no better precision than a few tens of
milliseconds, so one task wakes every ``resolution`` seconds and cancels whatever has
overrun; entering and leaving a deadline is then a dict insert and delete.

An overrun surfaces as ``TimeoutError`` from the ``async with`` block, as with
``asyncio.timeout``, and a cancellation from elsewhere stays a cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

RESOLUTION_S = 0.05


class Deadlines:
    """Hands out deadlines; owns the sweeper that enforces them (one per event loop)."""

    def __init__(self, resolution: float = RESOLUTION_S) -> None:
        self.resolution = resolution
        self._open: dict[Deadline, None] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self, seconds: float) -> Deadline:
        return Deadline(self, seconds)

    def _register(self, deadline: Deadline) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="deadlines")
        self._open[deadline] = None

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.resolution)
            now = loop.time()
            overrun = [d for d in self._open if d.when <= now and not d.expired]
            for deadline in overrun:
                deadline.expired = True
                deadline.task.cancel()

    async def close(self) -> None:
        if self._sweeper is not None:
            sweeper, self._sweeper = self._sweeper, None
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper


class Deadline:
    """``async with deadlines(s):`` raises TimeoutError once the block has run ``s`` seconds."""

    __slots__ = ("_cancelling", "_owner", "expired", "seconds", "task", "when")

    def __init__(self, owner: Deadlines, seconds: float) -> None:
        self._owner = owner
        self.seconds = seconds
        self.expired = False

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline must be entered inside a task")
        self.task = task
        self._cancelling = task.cancelling()
        self.when = task.get_loop().time() + self.seconds
        self._owner._register(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        del self._owner._open[self]
        # The sweeper cancels only a task suspended inside this block, so its cancellation
        # arrives here; one requested from elsewhere as well stays a cancellation.
        if self.expired:
            # Withdrawn whatever the block raised, or the task would count it for ever.
            others = self.task.uncancel() > self._cancelling
            if exc_type is asyncio.CancelledError and not others:
                raise TimeoutError from exc
