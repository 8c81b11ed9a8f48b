"""Fixtures for the process-level tests: a process harness and a recording hook server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.acceptance.harness import HookServer, Processes


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        await procs.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach every started process's output to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        procs = getattr(item, "funcargs", {}).get("processes")
        if isinstance(procs, Processes) and procs.started:
            report.sections.append(("ntorque processes", procs.report()))


@pytest.fixture
async def hook() -> AsyncIterator[HookServer]:
    server = HookServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
