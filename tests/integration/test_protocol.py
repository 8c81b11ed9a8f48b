"""ntorque.protocol's head deadline where ntorque's routes cannot reach: behind a slow answer,
before any request, and on a connection that breaks; a connection that sends nothing; and
an answer's head and body leaving in one write.

A stand-in ASGI app (one route slower than the deadline) runs under uvicorn with ntorque's
protocol class, so the timings are the protocol's alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from ntorque.protocol import HTTP_PROTOCOL, JsonErrorsProtocol
from tests.support import free_port, read_response, wait_until

DEADLINE_S = 0.5
SLOW_ANSWER_S = 1.5


async def stand_in_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW_ANSWER_S)
    body = scope["path"].encode() * (100 if scope["path"] == "/big" else 1)
    headers = [(b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serve(
    monkeypatch: pytest.MonkeyPatch, keep_alive_s: int = 5
) -> AsyncIterator[uvicorn.Server]:
    monkeypatch.setattr(JsonErrorsProtocol, "head_timeout_s", DEADLINE_S)
    config = uvicorn.Config(
        stand_in_app,
        host="127.0.0.1",
        port=free_port(),
        lifespan="off",
        log_level="warning",
        ws="none",
        loop="asyncio",
        http=HTTP_PROTOCOL,
        timeout_keep_alive=keep_alive_s,
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    serving = asyncio.create_task(server.serve(), name="uvicorn")
    try:
        await wait_until(lambda: server.started or serving.done(), message="uvicorn to start")
        yield server
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(serving, timeout=15)


async def connect(server: uvicorn.Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.config.port)


async def test_a_head_pipelined_behind_a_slow_answer_waits_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serve(monkeypatch) as server:
        reader, writer = await connect(server)
        try:
            # Given a slow request and, pipelined behind it, a head that never completes,
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHo")
            # then the slow request is answered whole, its answer not cut by a 408,
            first = await read_response(reader)
            # and the unfinished head is refused once that answer is out.
            second = await read_response(reader)
            async with asyncio.timeout(5):
                assert await reader.read() == b""
        finally:
            writer.close()
    assert (first.status, first.body) == (200, b"/slow")
    assert second.status == 408
    assert second.json()["code"] == "head_timeout"


@pytest.mark.parametrize("between", [0, 1, 2])
async def test_a_malformed_request_pipelined_behind_others_is_refused_after_their_answers(
    monkeypatch: pytest.MonkeyPatch, between: int
) -> None:
    async with serve(monkeypatch) as server:
        reader, writer = await connect(server)
        try:
            # Given a slow request, ``between`` requests queued behind it, and then one the
            # parser cannot read (a header line without a colon), all sent at once
            queued = b"".join(b"GET /q%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in range(between))
            writer.write(
                b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                + queued
                + b"GET /bad HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n"
            )
            # Then every request before it is answered, in order, its answer whole: the
            # 400 does not stand in for the first answer, whose request was served
            answers = [await read_response(reader) for _ in range(between + 2)]
            async with asyncio.timeout(5):
                assert await reader.read() == b""
        finally:
            writer.close()
    expected = [(200, b"/slow")] + [(200, b"/q%d" % n) for n in range(between)]
    assert [(a.status, a.body) for a in answers[:-1]] == expected
    # And the unreadable request is refused last, in JSON, and the connection closed
    assert answers[-1].status == 400
    assert answers[-1].json()["code"] == "bad_request"


async def test_blank_lines_that_begin_no_request_do_not_hold_a_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bytes that begin no request stop uvicorn's keep-alive timer as a head's bytes do."""
    async with serve(monkeypatch) as server:
        for request in (b"", b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"):
            reader, writer = await connect(server)
            try:
                if request:  # a kept-alive connection after an answer, or a fresh one
                    writer.write(request)
                    assert (await read_response(reader)).status == 200
                closed = asyncio.create_task(reader.read())
                started = time.monotonic()
                for _ in range(50):  # a blank line every 0.1 s, 5 s at most
                    if closed.done():
                        break
                    with contextlib.suppress(ConnectionError):
                        writer.write(b"\r\n")
                        await writer.drain()
                    await asyncio.sleep(0.1)
                async with asyncio.timeout(5):
                    rest = await closed
                elapsed_s = time.monotonic() - started
            finally:
                writer.close()
            assert rest == b"", "closed without a word, as an idle connection is"
            assert DEADLINE_S * 0.9 <= elapsed_s < DEADLINE_S + 2, elapsed_s


async def reset(server: uvicorn.Server, head: bytes) -> JsonErrorsProtocol:
    """Open a connection, send ``head``, then reset it; the server's protocol, once it is lost."""
    _, writer = await connect(server)
    writer.write(head)
    await writer.drain()
    protocol: JsonErrorsProtocol = await wait_until(
        lambda: next(iter(server.server_state.connections), None), message="a connection"
    )
    if head:
        await wait_until(lambda: protocol._head_timer is not None, message="the head timer")
    # A reset, not a clean close: uvicorn's connection_lost then gets an exception, and
    # cancels its own keep-alive timer only without one.
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    await wait_until(
        lambda: protocol not in server.server_state.connections, message="connection_lost"
    )
    return protocol


async def test_a_connection_reset_leaves_no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve(monkeypatch) as server:
        mid_head = await reset(server, b"GET / HTTP/1.1\r\nHo")
        assert mid_head._head_timer is None
        silent = await reset(server, b"")
        assert silent.timeout_keep_alive_task is None  # armed at connection_made


async def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serve(monkeypatch, keep_alive_s=1) as server:
        reader, writer = await connect(server)
        started = time.monotonic()
        try:
            async with asyncio.timeout(10):
                rest = await reader.read()
        finally:
            writer.close()
    assert rest == b""
    assert 0.9 <= time.monotonic() - started < 3


def _first_read(port: int, request: bytes) -> tuple[bytes, bytes]:
    """What one blocking recv returns once the request is sent, and the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        first = sock.recv(65536)
        whole = first
        while not whole.endswith(b"/big" * 100):
            more = sock.recv(65536)
            if not more:
                break
            whole += more
    return first, whole


async def test_an_answer_leaves_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    # A reader blocked in recv wakes at the first segment: had the head been written on its
    # own, the first read would (almost always) hold the head alone.
    async with serve(monkeypatch) as server:
        request = b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        for _ in range(5):
            first, whole = await asyncio.to_thread(_first_read, server.config.port, request)
            assert whole.startswith(b"HTTP/1.1 200 ") and whole.endswith(b"/big" * 100)
            assert first == whole
