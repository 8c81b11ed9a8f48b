"""Helpers shared by every test layer: ports, bounded waits, settings, hook servers, the API.

Nothing here mocks a service: the hook server is a real HTTP server on 127.0.0.1, the API
runs under a real uvicorn on a free port, and stores/notifiers are the production classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import httpx
import sqlalchemy as sa
from aiohttp import web
from multidict import CIMultiDict

from ntorque.hooks import AiohttpHookClient
from ntorque.models import NewTask
from ntorque.notify import Notifier
from ntorque.settings import Settings
from ntorque.store import Store
from ntorque.worker import Worker

# Overridable only so the skip/CI behaviour can be checked against closed ports.
PG_HOST = "127.0.0.1"
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_USER = "postgres"
REDIS_HOST = "127.0.0.1"
REDIS_PORT = int(os.environ.get("TEST_REDIS_PORT", "6379"))
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"

# Fast values so that retries, leases and requeues happen within a test's second or two.
FAST_ENV: dict[str, str] = {
    "NTORQUE_MIN_DUE_DELAY": "0.05",
    "NTORQUE_MAX_DUE_DELAY": "0.2",
    "NTORQUE_POLL_INTERVAL": "0.05",
    "NTORQUE_REQUEUE_INTERVAL": "0.1",
    "NTORQUE_DEFAULT_TIMEOUT": "5",
    "NTORQUE_MAX_RETRIES": "3",
    "NTORQUE_SHUTDOWN_GRACE": "5",
    "NTORQUE_AUTH_CACHE_SECONDS": "0",
    "NTORQUE_DB_TIMEOUT": "5",
    "NTORQUE_LOG_LEVEL": "warning",
    "NTORQUE_BOOTSTRAP_APP": "false",
}


# -- small utilities --------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the moment of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refused_url(path: str = "/hook") -> str:
    """An http URL on 127.0.0.1 whose port refuses connections."""
    return f"http://127.0.0.1:{free_port()}{path}"


async def wait_until(
    predicate: Callable[[], Any],
    timeout_s: float = 10.0,
    interval_s: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; return its value, or fail."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / interval_s) + 2):
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")


def wait_until_sync(
    predicate: Callable[[], Any],
    timeout_s: float = 10.0,
    interval_s: float = 0.05,
    message: str = "condition",
) -> Any:
    """Blocking twin of :func:`wait_until` for subprocess-driven tests."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / interval_s) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")


def make_env(**env: str | int | float) -> dict[str, str]:
    """FAST_ENV plus overrides (values are str()-ed; a value of None-string is not special)."""
    merged = dict(FAST_ENV)
    merged.update({k: str(v) for k, v in env.items()})
    return merged


def make_settings(
    env: Mapping[str, str] | None = None, /, **overrides: str | int | float
) -> Settings:
    """``Settings.from_env`` over FAST_ENV, ``env`` and keyword overrides (names as env vars)."""
    merged = dict(FAST_ENV)
    merged.update(env or {})
    merged.update({k: str(v) for k, v in overrides.items()})
    return Settings.from_env(merged)


def new_task(url: str, *, body: bytes = b"", app_id: int | None = None, **kw: Any) -> NewTask:
    """A NewTask with sensible defaults (POST, timeout 5, no headers)."""
    values: dict[str, Any] = {
        "url": url,
        "method": "POST",
        "timeout": 5,
        "body": body,
        "content_type": None,
        "headers": [],
        "app_id": app_id,
    }
    values.update(kw)
    return NewTask(**values)


# -- the hook server --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reply:
    """One scripted answer: status, optional delay, headers, body, or a redirect target."""

    status: int = 200
    delay_s: float = 0.0
    body: bytes = b"ok"
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    redirect_to: str | None = None  # a path on this server or an absolute URL


@dataclasses.dataclass(frozen=True)
class Recorded:
    """A request the hook server received."""

    method: str
    path: str
    query: str  # raw, as on the wire
    headers: CIMultiDict[str]
    body: bytes
    received_at: float  # time.time() when the request arrived
    finished_at: float | None = None


class HookServer:
    """A real HTTP server on 127.0.0.1 that records requests and answers from a script.

    ``script("/p", 500, 500, 200)`` answers the 1st, 2nd call with 500, then 200 for ever
    (the last reply repeats). Unscripted paths answer 200.
    """

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._scripts: dict[str, list[Reply]] = {}
        self._calls: dict[str, int] = {}
        self._inflight: dict[str, int] = {}
        self.max_concurrent: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    # The script

    def script(self, path: str, *replies: int | Reply) -> str:
        """Set the answers for ``path``; return its full URL."""
        self._scripts[path] = [r if isinstance(r, Reply) else Reply(status=r) for r in replies]
        return self.url(path)

    def url(self, path: str = "/hook", query: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")

    def calls(self, path: str | None = None) -> list[Recorded]:
        """Recorded requests, all or those to ``path``, in arrival order."""
        return [r for r in self.requests if path is None or r.path == path]

    def count(self, path: str | None = None) -> int:
        return len(self.calls(path))

    # Serving

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.path
        index = self._calls.get(path, 0)
        self._calls[path] = index + 1
        recorded = Recorded(
            method=request.method,
            path=path,
            # The raw query as sent (request.query_string would percent-decode it).
            query=request.raw_path.partition("?")[2],
            headers=CIMultiDict(request.headers),
            body=body,
            received_at=time.time(),
        )
        position = len(self.requests)
        self.requests.append(recorded)
        replies = self._scripts.get(path) or [Reply()]
        reply = replies[min(index, len(replies) - 1)]
        self._inflight[path] = self._inflight.get(path, 0) + 1
        self.max_concurrent[path] = max(self.max_concurrent.get(path, 0), self._inflight[path])
        try:
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
        finally:
            self._inflight[path] -= 1
            self.requests[position] = dataclasses.replace(recorded, finished_at=time.time())
        if reply.redirect_to is not None:
            target = reply.redirect_to
            if target.startswith("/"):
                target = self.url(target)
            return web.Response(status=reply.status, headers={"Location": target, **reply.headers})
        return web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))

    async def start(self, port: int = 0) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown: slow scripted answers must not hold the test's teardown.
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@contextlib.asynccontextmanager
async def hook_server_running() -> AsyncIterator[HookServer]:
    """A started :class:`HookServer`, stopped on exit."""
    server = HookServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# -- the API, served for real -----------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_app(
    settings: Settings, store: Store | None = None, notifier: Notifier | None = None
) -> AsyncIterator[str]:
    """Run ``ntorque.web.create_app`` under uvicorn on a free port in this loop; yield its URL."""
    import uvicorn

    from ntorque.protocol import HTTP_PROTOCOL
    from ntorque.web import create_app

    app = create_app(settings, store=store, notifier=notifier)
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="on",
        log_level="warning",
        access_log=False,
        ws="none",
        loop="asyncio",
        http=HTTP_PROTOCOL,
    )
    server = uvicorn.Server(config)
    # uvicorn would otherwise take over SIGINT/SIGTERM for the whole test process.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    serving = asyncio.create_task(server.serve(), name="uvicorn")
    try:
        await wait_until(
            lambda: server.started or serving.done(), timeout_s=15, message="uvicorn to start"
        )
        if serving.done():
            serving.result()
            raise AssertionError("uvicorn stopped during start-up")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(serving, timeout=15)


@contextlib.asynccontextmanager
async def api_client(
    settings: Settings,
    store: Store | None = None,
    notifier: Notifier | None = None,
    key: str | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on a freshly served app; ``key`` is sent as NTORQUE_API_KEY."""
    async with serve_app(settings, store, notifier) as base:
        headers = {"NTORQUE_API_KEY": key} if key else {}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
            yield client


# -- running the worker and the clock ---------------------------------------------------


async def run_burst(
    settings: Settings, store: Store, notifier: Notifier, timeout_s: float = 30.0
) -> None:
    """One ``Worker.run(burst=True)``: returns once nothing is due or in flight."""
    hooks = AiohttpHookClient(settings)
    worker = Worker(settings, store, notifier, hooks)
    try:
        async with asyncio.timeout(timeout_s):
            await worker.run(burst=True)
    finally:
        await hooks.close()


async def run_until_settled(
    settings: Settings,
    store: Store,
    notifier: Notifier,
    task_ids: Iterable[int],
    timeout_s: float = 30.0,
) -> None:
    """Run burst rounds until every task in ``task_ids`` is COMPLETED or FAILED.

    Retries become due later than a burst's end, so the rounds repeat (bounded by time).
    """
    ids = list(task_ids)
    deadline = time.monotonic() + timeout_s
    for _ in range(10_000):
        await run_burst(settings, store, notifier, timeout_s=max(deadline - time.monotonic(), 1))
        tasks = [await store.get_task(i) for i in ids]
        if all(t is not None and t.status != "PENDING" for t in tasks):
            return
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(settings.min_due_delay_s, 0.05))
    raise AssertionError(f"tasks {ids} did not settle within {timeout_s}s")


@contextlib.asynccontextmanager
async def worker_running(
    settings: Settings, store: Store, notifier: Notifier
) -> AsyncIterator[Worker]:
    """A worker running in the background until the block ends (then stopped and drained)."""
    hooks = AiohttpHookClient(settings)
    worker = Worker(settings, store, notifier, hooks)
    job = asyncio.create_task(worker.run(), name="test-worker")
    try:
        yield worker
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(job, timeout=settings.shutdown_grace_s + 10)
        finally:
            await hooks.close()


def ci() -> bool:
    """Whether this run is CI (services must be present; nothing may skip)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


async def gather_limited(coros: Iterable[Awaitable[Any]], limit: int = 20) -> list[Any]:
    """``asyncio.gather`` with at most ``limit`` running at once."""
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[Any]) -> Any:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


# -- raw HTTP, for requests well-behaved clients refuse to send ---------------------------


@dataclasses.dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)


async def raw_http(
    base_url: str,
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    timeout_s: float = 10.0,
) -> RawResponse:
    """Send one hand-written HTTP/1.1 request (no client-side validation at all)."""
    host, _, port = base_url.removeprefix("http://").rstrip("/").partition(":")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(head + body)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return parse_response(data)


def parse_response(data: bytes) -> RawResponse:
    """Parse a complete HTTP/1.1 response (Content-Length or chunked body)."""
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    body = rest
    if parsed.get("transfer-encoding", "").lower() == "chunked":
        body, chunks = b"", rest
        while chunks:
            size_line, _, chunks = chunks.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body += chunks[:size]
            chunks = chunks[size + 2 :]
    return RawResponse(status=int(status_line.split(" ")[1]), headers=parsed, body=body)


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    """One response off a kept-alive connection (ntorque's answers carry a Content-Length)."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(parse_response(head).headers["content-length"])
        return parse_response(head + await reader.readexactly(length))


async def count_tasks(store: Store) -> int:
    """Rows in the tasks table (to prove a refused request wrote nothing)."""
    import sqlalchemy as sa

    from ntorque.schema import tasks

    async with store.engine.connect() as conn:
        result = await conn.execute(sa.select(sa.func.count()).select_from(tasks))
        return int(result.scalar_one())


class FreezingProxy:
    """A TCP proxy to PostgreSQL that can go silent: from ``freeze()`` on, nothing it holds
    or accepts is passed on (a server gone behind a black hole, its connections open)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if self.frozen:
                    return  # swallowed, and nothing more is passed on this way
                writer.write(data)
                await writer.drain()
            writer.close()  # the end of one side, passed on

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if self.frozen:
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.append(up_writer)
        for pipe in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            task = asyncio.create_task(pipe)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    @classmethod
    async def in_front_of(cls, database_url: str) -> tuple[FreezingProxy, str]:
        """A started proxy to ``database_url``'s server, and the URL that goes through it."""
        url = sa.make_url(database_url)
        proxy = cls(url.port or 5432)
        port = await proxy.start()
        return proxy, url.set(port=port).render_as_string(hide_password=False)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers (a black-holed Redis)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
