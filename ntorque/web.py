"""The HTTP API (nTorque 0.4 compatible): routes only; rules live in validation and store."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry import propagate, trace
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import __version__, metrics, observe, tracing
from .batching import Batcher
from .constants import API_KEY_HEADERS
from .deadlines import Deadlines
from .models import NewTask, Task
from .notify import Notifier, NotifyError, create_notifier
from .protocol import JsonErrorsProtocol
from .settings import Settings
from .store import App, Store, connection_errors, open_store
from .validation import BadRequest, read_body, task_from_request

logger = logging.getLogger("ntorque.web")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def error_response(status: int, message: str, code: str, **headers: str) -> JSONResponse:
    metrics.api_error(status, code)
    return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


class Api:
    """The state behind the routes: store, notifier, the group-commit batcher, the key cache."""

    def __init__(self, settings: Settings, store: Store, notifier: Notifier) -> None:
        self.settings = settings
        self.store = store
        self.notifier = notifier
        # An enqueue that gave up (503) while queued is not inserted later: its client was
        # told to try again, and would otherwise have two tasks.
        self.inserter: Batcher[NewTask, Task] = Batcher(
            self._insert_and_notify,
            max_batch=1000,
            concurrency=3,
            name="enqueue",
            skip_abandoned=True,
        )
        self._keys: dict[str, tuple[App | None, float]] = {}
        self._lookups: dict[str, asyncio.Task[App | None]] = {}
        self.deadlines = Deadlines()

    async def _insert_and_notify(self, new: list[NewTask]) -> list[Task]:
        added = await self.store.add_tasks(new)
        # Committed: only now may anyone be told. Not while the channel is down: waiting on
        # it would hold every 201, and the clock's requeue and the workers' polls find these.
        if self.notifier.available():
            await self.ring([t.id for t in added])
        return added

    async def ring(self, ids: list[int]) -> None:
        try:
            await self.notifier.notify(ids)
        except NotifyError as exc:
            # The task is stored; the clock's requeue will ring for it.
            metrics.NOTIFY_FAILURES.labels(role="web").inc()
            logger.warning("action=notify failed for %d tasks: %s", len(ids), exc)

    async def db(self, awaitable: Any) -> Any:
        """Await a store call, turning an unreachable database into a prompt 503."""
        try:
            async with self.deadlines(self.settings.db_timeout_s):
                return await awaitable
        except connection_errors() as exc:
            # A deadline's TimeoutError says nothing by itself.
            reason = str(exc) or f"no answer within {self.settings.db_timeout_s:g} s"
            metrics.DATABASE_ERRORS.labels(role="web").inc()
            logger.error("database unavailable: %s", reason)
            raise ApiError(503, "the database is unavailable, try again", "unavailable") from exc

    async def authenticate(self, request: Request) -> App | None:
        """The caller's app; None when authentication is off. Raises 401 otherwise."""
        if not self.settings.authenticate:
            return None
        key = _api_key(request)
        if not key:
            raise ApiError(401, "an API key is required (header NTORQUE_API_KEY)", "unauthorized")
        # Keyed by the key itself: hashing it for the lookup cost more than the rest of the
        # check. Only the database sees (and stores) the hash.
        cached = self._keys.get(key)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            app = cached[0]
        else:
            app = await self.db(asyncio.shield(self._lookup(key)))
        if app is None:
            raise ApiError(401, "unknown or inactive API key", "unauthorized")
        return app

    def _lookup(self, key: str) -> asyncio.Task[App | None]:
        """The one database lookup of ``key`` in flight, shared by every request awaiting it.

        When a busy key's cache entry runs out, the requests arriving during its lookup would
        each run their own (tens of them at thousands of requests per second).
        """
        lookup = self._lookups.get(key)
        if lookup is None:
            lookup = asyncio.create_task(self._fetch_app(key), name="auth-lookup")
            self._lookups[key] = lookup
            lookup.add_done_callback(lambda done: self._lookup_done(key, done))
        return lookup

    async def _fetch_app(self, key: str) -> App | None:
        # A deadline of its own: the requests waiting on it each give up at theirs, but a
        # lookup stuck on a dead connection would otherwise be joined by every later request
        # for the key until the driver's statement timeout (30 s), the database long back.
        async with self.deadlines(self.settings.db_timeout_s):
            app = await self.store.app_for_key(key)
        if app is not None:
            if len(self._keys) > 10_000:
                self._keys.clear()
            self._keys[key] = (app, time.monotonic() + self.settings.auth_cache_s)
        return app

    def _lookup_done(self, key: str, done: asyncio.Task[App | None]) -> None:
        self._lookups.pop(key, None)
        if not done.cancelled():
            # Retrieved here too: its waiters may all have given up (503) before it ended.
            done.exception()

    async def task_for(self, request: Request, app: App | None) -> Task:
        raw = request.path_params["task_id"]
        if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
            raise ApiError(404, "no such task", "not_found")
        task: Task | None = await self.db(
            self.store.get_task(int(raw), None if app is None else app.id)
        )
        if task is None:
            raise ApiError(404, "no such task", "not_found")
        return task


def _api_key(request: Request) -> str | None:
    for name in API_KEY_HEADERS:
        value = request.headers.get(name)
        if value:
            return value.strip()
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _api(request: Request) -> Api:
    api: Api = request.app.state.api
    return api


async def root(request: Request) -> Response:
    # One route for both methods of "/": routing tries each route in turn, per request.
    if request.method == "POST":
        return await enqueue(request)
    return PlainTextResponse(f"ntorque {__version__}: a web-hook task queue.\n")


async def enqueue(request: Request) -> Response:
    started = time.perf_counter()
    api = _api(request)
    app = await api.authenticate(request)
    spec = task_from_request(request, api.settings)
    body = await read_body(
        request, api.settings.max_body_bytes, api.deadlines(api.settings.body_timeout_s)
    )

    def new_task(trace_context: str | None) -> NewTask:
        return NewTask(
            url=spec.url,
            method=spec.method,
            timeout=spec.timeout,
            body=body,
            content_type=spec.content_type,
            headers=spec.headers,
            app_id=None if app is None else app.id,
            trace_context=trace_context,
        )

    task: Task
    if tracing.off() and not _carries_trace(request):
        # Nothing to record and no caller trace to continue: skip the no-op span machinery,
        # but give the task a trace of its own, which every hook call will carry.
        task = await api.db(api.inserter.submit(new_task(tracing.new_carrier())))
    else:
        with tracing.tracer.start_as_current_span(
            "enqueue",
            context=tracing.extract(request.headers),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": spec.method, "server.address": spec.host},
        ) as span:
            # Nothing to carry when the caller's context is invalid and no tracer records.
            carrier = tracing.current_carrier() or tracing.new_carrier()
            task = await api.db(api.inserter.submit(new_task(carrier)))
            span.set_attribute("ntorque.task.id", task.id)
    metrics.labelled(metrics.TASKS_ENQUEUED, "-" if app is None else app.name).inc()
    metrics.ENQUEUE_SECONDS.observe(time.perf_counter() - started)
    location = f"{_base_url(request)}/tasks/{task.id}"
    return JSONResponse(task.to_json(), status_code=201, headers={"Location": location})


def _carries_trace(request: Request) -> bool:
    """Whether the request has any header the global trace propagator reads."""
    fields = _propagated_fields(propagate.get_global_textmap())
    return any(name in fields for name, _ in request.scope["headers"])


@functools.lru_cache(maxsize=8)
def _propagated_fields(textmap: Any) -> frozenset[bytes]:
    # A composite propagator builds its field set anew on every read: once per propagator.
    return frozenset(name.lower().encode("latin-1") for name in textmap.fields)


# Base URLs by what they are built from: building one costs more than a cached lookup.
_BASE_URLS: dict[tuple[Any, ...], str] = {}


def _base_url(request: Request) -> str:
    """``request.base_url`` without its trailing slash, cached on the scope parts it uses."""
    scope = request.scope
    host = next((value for name, value in scope["headers"] if name == b"host"), None)
    key = (
        scope.get("scheme"),
        host,
        scope.get("server"),
        scope.get("root_path", ""),
        scope.get("app_root_path"),
    )
    base = _BASE_URLS.get(key)
    if base is None:
        base = str(request.base_url).rstrip("/")
        if len(_BASE_URLS) > 1000:
            _BASE_URLS.clear()
        _BASE_URLS[key] = base
    return base


async def show_task(request: Request) -> Response:
    api = _api(request)
    task = await api.task_for(request, await api.authenticate(request))
    return JSONResponse(task.to_json())


async def push_task(request: Request) -> Response:
    api = _api(request)
    task = await api.task_for(request, await api.authenticate(request))
    if task.status == "PENDING":
        await api.ring([task.id])
    location = f"{_base_url(request)}/tasks/{task.id}"
    return JSONResponse(task.to_json(), status_code=201, headers={"Location": location})


async def metrics_endpoint(request: Request) -> Response:
    body, content_type = observe.exposition()
    return Response(body, media_type=content_type)


async def cluster_metrics_endpoint(request: Request) -> Response:
    """Every process's metrics, published through Redis (the Heroku route: see observe)."""
    try:
        body, content_type = await observe.cluster_exposition(_api(request).settings)
    except observe.MetricsUnavailable as exc:
        logger.warning("metrics channel unavailable: %s", exc)
        # Prometheus marks the target down: the right signal, and no 500.
        raise ApiError(503, "the metrics channel (Redis) is unavailable", "unavailable") from exc
    return Response(body, media_type=content_type)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    headers = {"Retry-After": "5"} if exc.status == 503 else {}
    return error_response(exc.status, exc.message, exc.code, **headers)


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    metrics.ENQUEUE_REJECTED.labels(reason=exc.code).inc()
    # The rest of a stalled body may never come: close rather than wait for it.
    headers = {"Connection": "close"} if exc.status == 408 else {}
    return error_response(exc.status, exc.message, exc.code, **headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(
        exc.status_code,
        exc.detail,
        codes.get(exc.status_code, "http_error"),
        **dict(exc.headers or {}),
    )


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error", "internal")


class HSTSMiddleware:
    """HSTS, and a redirect to https when the proxy's protocol header says http."""

    def __init__(self, app: ASGIApp, protocol_header: str | None) -> None:
        self.app = app
        self.protocol_header = protocol_header.encode() if protocol_header else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.protocol_header is not None:
            proto = dict(scope["headers"]).get(self.protocol_header, b"").decode("latin-1")
            if proto.lower() == "http":
                request = Request(scope)
                status = 301 if scope["method"] in ("GET", "HEAD") else 308
                url = request.url.replace(scheme="https")
                await RedirectResponse(str(url), status_code=status)(scope, receive, send)
                return

        async def send_with_hsts(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"strict-transport-security", b"max-age=31536000; includeSubDomains"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_hsts)


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    notifier: Notifier | None = None,
) -> Starlette:
    """The Starlette app. Given a store/notifier it uses them; else it opens its own."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        own_store = store is None
        own_notifier = notifier is None
        the_store = store if store is not None else await open_store(settings)
        the_notifier = notifier or create_notifier(settings, in_process=False)
        api = Api(settings, the_store, the_notifier)
        app.state.api = api
        try:
            yield
        finally:
            await api.inserter.drain()
            await api.deadlines.close()
            if own_notifier:
                await the_notifier.close()
            if own_store:
                await the_store.close()

    # The deadline of a request's head, which uvicorn's protocol class enforces (set here:
    # this factory is the one piece of ntorque every serving process runs).
    JsonErrorsProtocol.head_timeout_s = settings.body_timeout_s
    middleware = []
    if settings.enable_hsts:
        middleware.append(Middleware(HSTSMiddleware, protocol_header=settings.hsts_protocol_header))
    routes = [
        Route("/", root, methods=["GET", "POST"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/metrics/cluster", cluster_metrics_endpoint, methods=["GET"]),
    ]
    for prefix in ("/tasks", "/task"):
        routes.append(Route(prefix + "/{task_id}", show_task, methods=["GET"]))
        routes.append(Route(prefix + "/{task_id}/push", push_task, methods=["POST"]))
    return Starlette(
        debug=settings.development,
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            ApiError: _api_error,
            BadRequest: _bad_request,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )


def asgi_app() -> ASGIApp:
    """Factory for uvicorn (``ntorque web``): settings from the environment."""
    from . import tracing
    from .process import tune_gc

    settings = Settings.from_env()
    tracing.setup_tracing("web")
    app = observe.WebMetrics(create_app(settings), settings)
    tune_gc()
    return app
