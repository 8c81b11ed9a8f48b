"""``ntorque`` command line: one subcommand per Procfile role, plus run, migrate and apps."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from . import __version__
from .settings import Settings, SettingsError

logger = logging.getLogger("ntorque")


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # Alembic announces every plugin it loads at INFO; only migrations are news.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _describe(settings: Settings) -> str:
    if settings.is_sqlite:
        store = f"SQLite file {settings.database_url.split(':///', 1)[1]}"
    else:
        store = "PostgreSQL"
    channel = "Redis" if settings.redis_url else "in-process, or polling across processes"
    return f"store: {store}; notifications: {channel}"


@contextlib.contextmanager
def _one_shot(command: str) -> Iterator[None]:
    """A one-shot command the database cannot serve ends with one line and exit 1."""
    from .store import connection_errors

    try:
        yield
    except connection_errors() as exc:
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        reason = str(cause).splitlines()[0] if str(cause) else "no answer in time"
        print(
            f"ntorque: {command} failed, database error: {type(cause).__name__}: {reason}",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# -- shared process plumbing ----------------------------------------------------------


@contextlib.asynccontextmanager
async def _services(settings: Settings, role: str, *, in_process: bool) -> AsyncIterator[Any]:
    """Open store, notifier and metrics for a long-running role; close them on the way out."""
    from . import observe, tracing
    from .notify import create_notifier
    from .process import tune_gc
    from .store import open_store

    tracing.setup_tracing(role)
    store = await open_store(settings)
    notifier = create_notifier(settings, in_process=in_process)
    publisher = await observe.start_process_metrics(settings, role)
    tune_gc()
    try:
        yield store, notifier
    finally:
        await observe.stop_process_metrics(publisher)
        await notifier.close()
        await store.close()


def _on_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop)


async def _supervise(jobs: dict[str, Coroutine[Any, Any, None]], stop: Callable[[], None]) -> None:
    """Run named side tasks; if one dies, stop the rest and fail loudly."""
    tasks = {asyncio.create_task(coro, name=name) for name, coro in jobs.items()}
    failed: BaseException | None = None
    pending = tasks
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is not None and failed is None:
                failed = task.exception()
                logger.error("%s died: %r; stopping", task.get_name(), failed)
                stop()
    if failed is not None:
        raise SystemExit(f"ntorque: {failed}")


# -- roles ------------------------------------------------------------------------------


async def _worker_main(settings: Settings, burst: bool) -> None:
    from .hooks import create_hook_client
    from .worker import Worker

    async with _services(settings, "worker", in_process=False) as (store, notifier):
        hooks = create_hook_client(settings)
        worker = Worker(settings, store, notifier, hooks)
        _on_signals(asyncio.get_running_loop(), worker.stop)
        logger.info(
            "worker started (%s; concurrency %d)", _describe(settings), settings.worker_concurrency
        )
        try:
            await worker.run(burst=burst)
        finally:
            await hooks.close()
        logger.info("worker stopped")


async def _clock_main(settings: Settings, once: bool) -> None:
    from .clock import Clock

    async with _services(settings, "clock", in_process=False) as (store, notifier):
        clock = Clock(settings, store, notifier)
        if once:
            await clock.tick()
            await clock.cleanup()
            return
        _on_signals(asyncio.get_running_loop(), clock.stop)
        logger.info(
            "clock started (%s; every %gs)", _describe(settings), settings.requeue_interval_s
        )
        await clock.run()
        logger.info("clock stopped")


async def _run_main(settings: Settings, host: str) -> None:
    """Web, worker and clock in one process, sharing one store and one notifier."""

    from .clock import Clock
    from .hooks import create_hook_client
    from .web import create_app
    from .worker import Worker

    async with _services(settings, "run", in_process=True) as (store, notifier):
        await _bootstrap_app(settings, store)
        hooks = create_hook_client(settings)
        worker = Worker(settings, store, notifier, hooks)
        clock = Clock(settings, store, notifier)
        app = create_app(settings, store=store, notifier=notifier)
        server = _EmbeddedServer(_uvicorn_config(app, settings, host))

        def stop() -> None:
            server.should_exit = True
            worker.stop()
            clock.stop()

        _on_signals(asyncio.get_running_loop(), stop)
        print(
            f"ntorque {__version__} listening on http://{host}:{settings.port}"
            f" ({_describe(settings)})",
            flush=True,
        )

        async def serve() -> None:
            await server.serve()
            stop()

        try:
            await _supervise({"web": serve(), "worker": worker.run(), "clock": clock.run()}, stop)
        finally:
            await hooks.close()


class _EmbeddedServer:
    """A uvicorn server that leaves signal handling to ntorque (it shares the process)."""

    def __new__(cls, config: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

            def install_signal_handlers(self) -> None:
                return None

        return Server(config)


def _uvicorn_config(app: Any, settings: Settings, host: str) -> Any:
    import uvicorn

    from .protocol import HTTP_PROTOCOL

    return uvicorn.Config(
        app,
        host=host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=settings.development,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        lifespan="on",
        http=HTTP_PROTOCOL,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )


async def _bootstrap_app(settings: Settings, store: Any) -> None:
    """On the first start of an empty store, create an app and show its key once."""
    if not (settings.authenticate and settings.bootstrap_app):
        return
    if await store.count_apps() > 0:
        return
    _, key = await store.create_app("default")
    print(
        "\n  First start: created the app 'default'. Its API key, shown only this once:\n"
        f"\n      {key}\n\n"
        "  Send it as the NTORQUE_API_KEY header. More apps: ntorque create-app --name NAME\n",
        flush=True,
    )


def _web(settings: Settings, host: str) -> None:
    import uvicorn

    from . import observe
    from .protocol import HTTP_PROTOCOL

    observe.prepare_web_workers(settings)
    uvicorn.run(
        "ntorque.web:asgi_app",
        factory=True,
        host=host,
        port=settings.port,
        workers=None if settings.development else settings.web_concurrency,
        reload=settings.development,
        # The code, not the working directory: the SQLite file, its journal and any log
        # written there would each count as a change.
        reload_dirs=[str(Path(__file__).resolve().parent)] if settings.development else None,
        log_level=settings.log_level.lower(),
        access_log=settings.development,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        http=HTTP_PROTOCOL,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )


async def _create_app(settings: Settings, name: str) -> str:
    from .store import open_store

    store = await open_store(settings)
    try:
        _, key = await store.create_app(name)
    finally:
        await store.close()
    return key


async def _set_active(settings: Settings, name: str, active: bool) -> int:
    from .store import open_store

    store = await open_store(settings)
    try:
        return await store.set_app_active(name, active)
    finally:
        await store.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ntorque", description="A web-hook task queue.")
    parser.add_argument("--version", action="version", version=f"ntorque {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    web = sub.add_parser("web", help="serve the HTTP API on $PORT")
    web.add_argument("--host", default="0.0.0.0")
    worker = sub.add_parser("worker", help="call hooks")
    worker.add_argument("--burst", action="store_true", help="exit once nothing is due")
    clock = sub.add_parser("clock", help="requeue due tasks and clean up old ones")
    clock.add_argument("--once", action="store_true", help="one round, then exit")
    run = sub.add_parser("run", help="web, worker and clock in one process")
    run.add_argument("--host", default="127.0.0.1")
    sub.add_parser("migrate", help="alembic upgrade head")
    create = sub.add_parser("create-app", help="create an app and print its API key")
    create.add_argument("--name", required=True)
    for verb in ("deactivate-app", "activate-app"):
        toggle = sub.add_parser(verb, help=f"{verb.split('-')[0]} an app's keys")
        toggle.add_argument("--name", required=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"ntorque: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    _setup_logging(settings)
    if settings.is_sqlite:
        from .db import check_sqlite_file

        try:
            check_sqlite_file(settings)
        except SettingsError as exc:
            print(f"ntorque: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    if args.command == "web":
        _web(settings, args.host)
        return
    if args.command == "migrate":
        from .db import upgrade

        with _one_shot("migrate"):
            upgrade(settings)
        print(f"ntorque: schema is up to date ({_describe(settings)})", file=sys.stderr)
        return
    _use_uvloop()
    if args.command == "worker":
        asyncio.run(_worker_main(settings, args.burst))
    elif args.command == "clock":
        asyncio.run(_clock_main(settings, args.once))
    elif args.command == "run":
        asyncio.run(_run_main(settings, args.host))
    elif args.command == "create-app":
        name = args.name.strip()
        if not name or len(name) > 255:
            print("ntorque: --name must be 1 to 255 characters", file=sys.stderr)
            raise SystemExit(2)
        with _one_shot("create-app"):
            key = asyncio.run(_create_app(settings, name))
        print(f"created app {name!r}; its API key (shown once):", file=sys.stderr)
        print(key)
    else:
        active = args.command == "activate-app"
        name = args.name.strip()  # as create-app stored it
        with _one_shot(args.command):
            count = asyncio.run(_set_active(settings, name, active))
        if not count:
            print(f"ntorque: no app named {name!r}", file=sys.stderr)
            raise SystemExit(1)
        done = "activated" if active else "deactivated"
        # Names need not be unique (create-app twice gives a second key): say how many.
        which = f"app {name!r}" if count == 1 else f"{count} apps named {name!r}"
        print(f"{which} {done}", file=sys.stderr)


if __name__ == "__main__":
    main()
