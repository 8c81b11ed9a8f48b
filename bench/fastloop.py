"""Run a bench process's coroutine on uvloop, as ntorque's own processes do."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

R = TypeVar("R")


def run(main: Coroutine[Any, Any, R]) -> R:
    try:
        import uvloop
    except ImportError:  # uvicorn[standard] brings it everywhere but Windows and PyPy
        return asyncio.run(main)
    return uvloop.run(main)
