"""Hooks that break HTTP: raw socket servers on 127.0.0.1, the real worker and stores."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from ntorque.notify import Notifier
from ntorque.settings import Settings
from ntorque.store import Store
from tests.support import new_task, run_until_settled, wait_until, worker_running

pytestmark = pytest.mark.ntorque_env(NTORQUE_MAX_RETRIES="2")

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# Answers one request on a connection: given the request's number on that connection
# (1, 2, …) and the writer; returns whether to keep the connection for another request.
Answer = Callable[[int, asyncio.StreamWriter], Awaitable[bool]]


@contextlib.asynccontextmanager
async def raw_hook(answer: Answer) -> AsyncIterator[tuple[str, list[int]]]:
    """A raw HTTP/1.1 server: (its URL, the per-connection number of every request)."""
    requests: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for number in range(1, 100):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                requests.append(number)
                if not await answer(number, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/hook", requests
    finally:
        server.close()
        await server.wait_closed()


async def test_an_unparseable_answer_is_retried_with_a_one_line_error(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    # Given a hook whose server answers something that is not HTTP
    async def garbage(number: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"THIS IS NOT HTTP\r\n\r\n")
        await writer.drain()
        return False

    async with raw_hook(garbage) as (url, requests):
        [task] = await store.add_tasks([new_task(url)])
        await run_until_settled(settings, store, notifier, [task.id])
    # Then it is retried as a network error, and the error says what happened in one line,
    # without a status code the hook never sent
    done = await store.get_task(task.id)
    assert done is not None
    assert (done.status, done.retry_count, done.last_status) == ("FAILED", 3, None)
    assert done.last_error is not None
    assert done.last_error.startswith("invalid response: Bad status line")
    assert "\n" not in done.last_error and "400" not in done.last_error
    assert len(requests) == 3


@pytest.mark.parametrize("method", ["POST", "PATCH", "PUT"])
@pytest.mark.ntorque_env(NTORQUE_MAX_RETRIES="0")
async def test_a_keep_alive_connection_closed_by_the_hook_costs_no_attempt(
    settings: Settings, store: Store, notifier: Notifier, method: str
) -> None:
    # Given a hook server that keeps a connection open after its answer, and closes it
    # when the next request arrives on it (its keep-alive timeout, at that very moment)
    async def first_only(number: int, writer: asyncio.StreamWriter) -> bool:
        if number > 1:
            return False
        writer.write(OK)
        await writer.drain()
        return True

    async with raw_hook(first_only) as (url, requests), worker_running(settings, store, notifier):
        tasks = []
        for _ in range(2):
            # When two tasks are delivered one after the other (the second on the pooled
            # connection)
            [task] = await store.add_tasks([new_task(url, method=method)])
            await notifier.notify([task.id])
            tasks.append(task.id)

            async def settled(task_id: int = task.id) -> bool:
                got = await store.get_task(task_id)
                return got is not None and got.status != "PENDING"

            await wait_until(settled, message=f"task {task.id} settled")
    # Then the second is sent again on a fresh connection within its one attempt
    for task_id in tasks:
        done = await store.get_task(task_id)
        assert done is not None
        assert (done.status, done.retry_count, done.last_status) == ("COMPLETED", 1, 200)
    assert requests == [1, 2, 1]


@pytest.mark.ntorque_env(NTORQUE_MAX_RETRIES="0", NTORQUE_DEFAULT_TIMEOUT="2")
async def test_an_error_naming_bytes_that_are_not_utf8_is_stored_with_the_other_outcomes(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    # Given a hook redirecting to a Location of bytes that are not UTF-8 (aiohttp decodes
    # them to lone surrogates, which neither PostgreSQL nor SQLite can store), among good
    # hooks whose outcomes are recorded in the same batch
    async def poison(number: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 302 Found\r\nLocation: ftp://a/\xff\xed\xa0\x80\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        return False

    async def good(number: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(OK)
        await writer.drain()
        return False

    async with raw_hook(poison) as (bad_url, _), raw_hook(good) as (good_url, _):
        added = await store.add_tasks([new_task(bad_url)] + [new_task(good_url)] * 20)
        await run_until_settled(settings, store, notifier, [t.id for t in added], timeout_s=10)
    # Then every outcome is recorded at the first attempt: the good hooks' tasks completed,
    # the bad one failed with the bytes its error names escaped
    done = [await store.get_task(t.id) for t in added]
    assert all(t is not None and t.retry_count == 1 for t in done)
    assert [t.status for t in done if t is not None] == ["FAILED"] + ["COMPLETED"] * 20
    assert done[0] is not None
    assert done[0].last_error == (
        "invalid url: ftp://a/\\xff\\xed\\xa0\\x80 - redirect to a non-http(s) URL"
    )
