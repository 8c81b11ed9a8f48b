"""One task, two attempts (500 then 200): one trace from the client through ntorque to the hook."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ntorque import tracing
from ntorque.notify import LocalNotifier
from ntorque.settings import Settings
from ntorque.store import Store
from tests import support
from tests.support import HookServer

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """ntorque's spans, recorded in memory (the global tracer provider is left alone)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_tracer_provider(None)
        provider.shutdown()


Embedded = tuple[Settings, Store, LocalNotifier]


@pytest.fixture
async def embedded(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[Embedded]:
    """ntorque's settings, store and notifier on a fresh SQLite file, without authentication."""
    path = tmp_path / "ntorque.sqlite3"
    shutil.copyfile(sqlite_template, path)
    settings = support.make_settings(NTORQUE_SQLITE_PATH=str(path), NTORQUE_AUTHENTICATE="false")
    store = Store.from_settings(settings)
    notifier = LocalNotifier(settings.notify_backlog_limit)
    try:
        yield settings, store, notifier
    finally:
        await notifier.close()
        await store.close()


async def test_one_trace_covers_enqueue_acquires_and_hook_calls(
    spans: InMemorySpanExporter, hook_server: HookServer, embedded: Embedded
) -> None:
    # Given ntorque (SQLite, in-process) and a hook answering 500, then 200,
    settings, store, notifier = embedded
    url = hook_server.script("/traced", 500, 200)
    # when a client inside a trace enqueues one task,
    async with support.api_client(settings, store, notifier) as api:
        response = await api.post(
            "/",
            params={"url": url},
            content=b"{}",
            headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
        )
        assert response.status_code == 201
        task_id = int(response.json()["id"])
    # and the worker takes it twice,
    await support.run_until_settled(settings, store, notifier, [task_id])
    task = await store.get_task(task_id)
    assert task is not None and task.status == "COMPLETED" and task.retry_count == 2

    # then every span belongs to the client's trace,
    finished = spans.get_finished_spans()
    by_name: dict[str, list] = {}
    for span in finished:
        by_name.setdefault(span.name, []).append(span)
    assert {name: len(group) for name, group in by_name.items()} == {
        "enqueue": 1,
        "acquire": 2,
        "hook": 2,
    }
    assert {format(s.context.trace_id, "032x") for s in finished} == {CLIENT_TRACE}
    (enqueue,) = by_name["enqueue"]
    assert format(enqueue.parent.span_id, "016x") == CLIENT_SPAN
    assert enqueue.attributes["ntorque.task.id"] == task_id
    # the worker's spans continue the enqueue span,
    for span in by_name["acquire"] + by_name["hook"]:
        assert span.parent.span_id == enqueue.context.span_id
        assert span.attributes["ntorque.task.id"] == task_id
        assert span.attributes["server.address"] == "127.0.0.1"
        assert span.attributes["http.request.method"] == "POST"
    hooks = sorted(by_name["hook"], key=lambda s: s.attributes["ntorque.task.attempt"])
    assert [s.attributes["ntorque.task.attempt"] for s in hooks] == [1, 2]
    assert [s.attributes["http.response.status_code"] for s in hooks] == [500, 200]
    acquires = sorted(by_name["acquire"], key=lambda s: s.attributes["ntorque.task.attempt"])
    assert [s.attributes["ntorque.task.attempt"] for s in acquires] == [1, 2]

    # and the hook saw, on each attempt, a traceparent of that trace naming that attempt's span.
    seen = [r.headers.get("traceparent") for r in hook_server.calls("/traced")]
    expected = [f"00-{CLIENT_TRACE}-{s.context.span_id:016x}-01" for s in hooks]
    assert seen == expected


def test_tracing_is_off_unless_the_environment_asks() -> None:
    # No OTEL_* at all, an explicit "none", or the SDK disabled: no exporter is installed.
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert tracing.setup_tracing("web", {}) is False
    assert tracing.setup_tracing("web", {**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is False
    assert tracing.setup_tracing("web", {**endpoint, "OTEL_SDK_DISABLED": "true"}) is False


TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[01]$")


async def test_with_tracing_off_every_hook_call_carries_a_traceparent_of_the_tasks_trace(
    hook_server: HookServer, embedded: Embedded
) -> None:
    # Given ntorque with no tracer installed (no OTEL_* variables), a hook answering 500
    # then 200, and one answering 200,
    assert tracing.off()
    settings, store, notifier = embedded
    retried = hook_server.script("/off-retried", 500, 200)
    other = hook_server.script("/off-other", 200)
    invalid = hook_server.script("/off-invalid", 200)
    # when clients that send no traceparent (or an invalid one) enqueue tasks,
    async with support.api_client(settings, store, notifier) as api:
        ids = []
        for url, headers in ((retried, {}), (other, {}), (invalid, {"traceparent": "00-x"})):
            response = await api.post("/", params={"url": url}, content=b"{}", headers=headers)
            assert response.status_code == 201
            ids.append(int(response.json()["id"]))
    # and a client writes one itself, with no trace context at all,
    (written,) = await store.add_tasks([support.new_task(other)])
    await support.run_until_settled(settings, store, notifier, [*ids, written.id])

    # then every hook call carried a valid traceparent,
    def trace_ids(path: str) -> list[str]:
        seen = [r.headers.get("traceparent", "") for r in hook_server.calls(path)]
        matches = [TRACEPARENT.match(value) for value in seen]
        assert all(matches), seen
        return [m.group(1) for m in matches if m]

    first, second = trace_ids("/off-retried")
    others = trace_ids("/off-other")
    (from_invalid,) = trace_ids("/off-invalid")
    # both attempts of the retried task in one trace, and each task in a trace of its own.
    assert first == second
    assert len({first, from_invalid, *others}) == 4
