"""The bad-input battery (SPEC §3): every case a 4xx JSON error, never a 500, no task row.

Requests are written by hand on a socket, so nothing a polite client would refuse to send
is filtered out before ntorque sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
import pytest

from ntorque.hooks import AiohttpHookClient
from ntorque.models import Task
from ntorque.notify import Notifier
from ntorque.settings import Settings
from ntorque.store import Store
from tests.conftest import backend_param
from tests.support import (
    HookServer,
    count_tasks,
    parse_response,
    raw_http,
    read_response,
    run_until_settled,
    serve_app,
)

pytestmark = pytest.mark.ntorque_env(NTORQUE_MAX_BODY_BYTES="1000")

HOOK = "http://127.0.0.1:9/hook"
# The connection's own behaviour (ntorque.protocol): which store is behind it plays no part.
ONE_BACKEND = pytest.mark.parametrize("backend", [backend_param("sqlite-local")], indirect=True)


def q(url: str) -> str:
    return "/?url=" + quote(url, safe="")


@dataclass(frozen=True)
class Case:
    name: str
    target: str
    method: str = "POST"
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    status: int = 400
    # The HTTP parser may refuse a malformed request before the routes see it: its 400 is
    # ntorque's JSON error too (ntorque.protocol), or at worst a dropped connection.
    server_may_refuse: bool = False


async def send_head(
    base: str, key: str, headers: str, body: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a raw connection to ``base`` and send a task request's head (and ``body``) by hand."""
    host, _, port = base.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            f"POST {q(HOOK)} HTTP/1.1\r\nHost: {host}\r\nNTORQUE_API_KEY: {key}\r\n"
            f"{headers}\r\n{body}"
        ).encode()
    )
    await writer.drain()
    return reader, writer


def passthrough(name: str, value: str = "v") -> list[tuple[str, str]]:
    return [(f"NTORQUE-PASSTHROUGH-{name}", value)]


CASES = [
    Case("missing url", "/"),
    Case("empty url", "/?url="),
    Case("relative url", q("/hook")),
    Case("url without scheme", q("example.com/hook")),
    Case("over-long url", q("http://example.com/" + "a" * 3000)),
    Case("ftp scheme", q("ftp://example.com/f")),
    Case("javascript scheme", q("javascript:alert(1)")),
    Case("file scheme", q("file:///etc/passwd")),
    Case("url with a space", q("http://exa mple.com/")),
    Case("url with a control char", q("http://example.com/\x01")),
    Case("url with CRLF", q("http://example.com/\r\nX-Evil: 1")),
    Case("url without host", q("http:///path")),
    Case("url with bad port", q("http://example.com:99999/")),
    Case("url with non-numeric port", q("http://example.com:abc/")),
    Case("url given twice", q(HOOK) + "&url=" + quote(HOOK, safe="")),
    Case("method GET", q(HOOK) + "&method=GET"),
    Case("method TRACE", q(HOOK) + "&method=TRACE"),
    Case("empty method", q(HOOK) + "&method="),
    Case("timeout not a number", q(HOOK) + "&timeout=abc"),
    Case("timeout zero", q(HOOK) + "&timeout=0"),
    Case("timeout negative", q(HOOK) + "&timeout=-5"),
    Case("timeout float", q(HOOK) + "&timeout=1.5"),
    Case("timeout over max", q(HOOK) + "&timeout=3601"),
    Case("timeout huge", q(HOOK) + "&timeout=" + "9" * 30),
    Case("timeout given twice", q(HOOK) + "&timeout=5&timeout=6"),
    Case("passthrough Host", q(HOOK), headers=passthrough("Host", "evil.example")),
    Case("passthrough Content-Length", q(HOOK), headers=passthrough("Content-Length", "5")),
    Case("passthrough Transfer-Encoding", q(HOOK), headers=passthrough("Transfer-Encoding")),
    Case("passthrough Connection", q(HOOK), headers=passthrough("Connection", "close")),
    Case("passthrough Upgrade", q(HOOK), headers=passthrough("Upgrade", "h2c")),
    Case("passthrough Content-Type", q(HOOK), headers=passthrough("Content-Type", "x/y")),
    Case("passthrough task id", q(HOOK), headers=passthrough("NTORQUE-TASK-ID", "1")),
    Case("passthrough traceparent", q(HOOK), headers=passthrough("traceparent", "00-x")),
    Case("passthrough empty name", q(HOOK), headers=passthrough("")),
    Case(
        "passthrough invalid name",
        q(HOOK),
        headers=passthrough("a(b)"),
        server_may_refuse=True,
    ),
    Case(
        "passthrough control char value",
        q(HOOK),
        headers=passthrough("X-A", "a\x01b"),
        server_may_refuse=True,
    ),
    Case(
        "passthrough CR in value",
        q(HOOK),
        headers=passthrough("X-A", "a\rb"),
        server_may_refuse=True,
    ),
    Case("passthrough over-long value", q(HOOK), headers=passthrough("X-A", "v" * 9000)),
    # raw_http sends str headers as Latin-1: "\xe9" is the single byte 0xE9, not UTF-8.
    Case("passthrough Latin-1 value", q(HOOK), headers=passthrough("X-A", "caf\xe9")),
    Case("passthrough invalid UTF-8", q(HOOK), headers=passthrough("X-A", "\xc3\x28")),
    Case(
        "too many passthrough headers",
        q(HOOK),
        headers=[(f"NTORQUE-PASSTHROUGH-X-H{i}", "v") for i in range(40)],
    ),
    Case("long query string", q(HOOK) + "&pad=" + "x" * 7000),
    Case("huge query string", q(HOOK) + "&pad=" + "x" * 100_000, server_may_refuse=True),
    Case(
        "content type with control char",
        q(HOOK),
        headers=[("Content-Type", "text/plain\x01")],
        server_may_refuse=True,
    ),
    Case("content type in Latin-1", q(HOOK), headers=[("Content-Type", "text/caf\xe9")]),
    Case("url with an empty host label", q("http://a..b/")),
    Case("url with only dots for a host", q("http://.../")),
    Case("url with a host label over 63", q("http://" + "a" * 64 + ".example/")),
    Case("body over the limit", q(HOOK), body=b"x" * 2000, status=413),
    # Task ids and routes.
    Case("task id letters", "/tasks/abc", method="GET", status=404),
    Case("task id negative", "/tasks/-1", method="GET", status=404),
    Case("task id zero", "/tasks/0", method="GET", status=404),
    Case("task id float", "/tasks/1.5", method="GET", status=404),
    Case("task id huge", "/tasks/" + "9" * 25, method="GET", status=404),
    Case("task id beyond bigint", "/tasks/9223372036854775808", method="GET", status=404),
    Case("task id NUL", "/tasks/%00", method="GET", status=404),
    Case("task id unicode digits", "/tasks/%D9%A1", method="GET", status=404),
    Case("unknown task", "/tasks/424242", method="GET", status=404),
    Case("push unknown task", "/tasks/424242/push", status=404),
    Case("push malformed id", "/task/x1/push", status=404),
    Case("unknown route", "/nope", method="GET", status=404),
    Case("unknown nested route", "/tasks/1/pull", method="POST", status=404),
    Case("PUT on /", "/", method="PUT", status=405),
    Case("DELETE a task", "/tasks/1", method="DELETE", status=405),
    Case("GET push", "/tasks/1/push", method="GET", status=405),
    Case("POST metrics", "/metrics", status=405),
]


async def test_bad_input_battery(settings: Settings, store: Store, notifier: Notifier) -> None:
    _, key = await store.create_app("battery")
    assert len(CASES) >= 25
    problems: list[str] = []
    async with serve_app(settings, store, notifier) as base:
        for case in CASES:
            headers = [("NTORQUE_API_KEY", key), *case.headers]
            try:
                response = await raw_http(base, case.method, case.target, headers, case.body)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                if not case.server_may_refuse:
                    problems.append(f"{case.name}: connection dropped ({exc})")
                continue
            is_json = response.headers.get("content-type", "").startswith("application/json")
            if response.status != case.status:
                problems.append(f"{case.name}: {response.status} {response.body[:200]!r}")
            elif not is_json or not response.json().get("error"):
                problems.append(f"{case.name}: not a JSON error: {response.body[:200]!r}")
        # The same hook URL is accepted when nothing else is wrong (the cases are precise).
        ok = await raw_http(base, "POST", q(HOOK), [("NTORQUE_API_KEY", key)], b"fine")
        assert ok.status == 201, ok.body
    assert not problems, "\n".join(problems)
    assert await count_tasks(store) == 1, "no refused request wrote a task"


async def test_chunked_body_over_the_limit_is_refused_while_streaming(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    _, key = await store.create_app("stream")
    chunk = b"y" * 16_384
    total_chunks = 4096  # 64 MiB offered; the limit is 1000 bytes
    sent = 0
    async with serve_app(settings, store, notifier) as base:
        reader, writer = await send_head(
            base,
            key,
            "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n",
        )

        async def stream() -> None:
            nonlocal sent
            for _ in range(total_chunks):
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                await writer.drain()
                sent += 1
            writer.write(b"0\r\n\r\n")
            await writer.drain()

        streaming = asyncio.create_task(stream())
        sent_when_answered = -1
        try:
            async with asyncio.timeout(30):
                data = b""
                while b"\r\n\r\n" not in data:
                    more = await reader.read(65536)
                    if not more:
                        break
                    data += more
                sent_when_answered = sent
                # Read the rest of the (small) body if the server sent it.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        while more := await reader.read(65536):
                            data += more
        finally:
            streaming.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await streaming
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    response = parse_response(data)
    assert response.status == 413
    assert response.json()["code"] == "body_too_large"
    assert sent_when_answered < total_chunks, "answered before the client finished sending"
    assert await count_tasks(store) == 0


async def test_declared_length_over_the_limit_is_refused_before_reading(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    _, key = await store.create_app("declared")
    async with serve_app(settings, store, notifier) as base:
        # Declare 50 MB but send only the headers: a server that waited for the body
        # before checking would hang here.
        reader, writer = await send_head(base, key, "Content-Length: 50000000\r\n")
        started = time.monotonic()
        async with asyncio.timeout(20):
            data = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        assert time.monotonic() - started < 20
    assert data.startswith(b"HTTP/1.1 413")
    assert await count_tasks(store) == 0


@pytest.mark.ntorque_env(NTORQUE_BODY_TIMEOUT="1")
async def test_a_body_that_stalls_is_refused_and_its_connection_closed(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    _, key = await store.create_app("stalled")
    async with serve_app(settings, store, notifier) as base:
        # Given a request that declares 100 bytes, sends 10 and then stalls,
        reader, writer = await send_head(base, key, "Content-Length: 100\r\n", "x" * 10)
        # then it is answered 408 and the connection is closed (read() reaches EOF).
        try:
            async with asyncio.timeout(15):
                data = await reader.read()
        finally:
            writer.close()
    response = parse_response(data)
    assert response.status == 408
    assert response.headers["connection"] == "close"
    assert response.json()["code"] == "body_timeout"
    assert await count_tasks(store) == 0


async def test_an_endless_request_head_is_refused_with_431(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    async with serve_app(settings, store, notifier) as base:
        host, _, port = base.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        # Given a request whose one header never ends (the parser sets no limit),
        writer.write(f"POST / HTTP/1.1\r\nHost: {host}\r\nX-Big: ".encode())
        answer = asyncio.create_task(reader.read())
        try:
            async with asyncio.timeout(15):
                for _ in range(64):  # 4 MiB at most
                    if answer.done():
                        break
                    with contextlib.suppress(ConnectionError):
                        writer.write(b"a" * 65536)
                        await writer.drain()
                    await asyncio.sleep(0.01)
                # then it is answered 431 and the connection is closed long before the end.
                data = await answer
        finally:
            writer.close()
    response = parse_response(data)
    assert response.status == 431
    assert response.headers["connection"] == "close"
    assert response.json()["code"] == "headers_too_large"


def task_request(host: str, key: str, body: bytes = b"x") -> tuple[bytes, bytes]:
    """A task request's head and body, to be written by hand on a kept-alive connection."""
    head = (
        f"POST {q(HOOK)} HTTP/1.1\r\nHost: {host}\r\nNTORQUE_API_KEY: {key}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode(), body


async def send_in_pieces(
    writer: asyncio.StreamWriter, data: bytes, pieces: int, gap_s: float
) -> None:
    """Write ``data`` as ``pieces`` writes, ``gap_s`` apart (so the server reads it piecemeal)."""
    size = -(-len(data) // pieces)
    for start in range(0, len(data), size):
        if start:
            await asyncio.sleep(gap_s)
        writer.write(data[start : start + size])
        await writer.drain()


@ONE_BACKEND
@pytest.mark.ntorque_env(NTORQUE_BODY_TIMEOUT="1")
async def test_a_head_that_dribbles_in_is_refused_with_408_and_closed(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    _, key = await store.create_app("dribble")
    async with serve_app(settings, store, notifier) as base:
        host, _, port = base.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head, _ = task_request(host, key)
        answer = asyncio.create_task(reader.read())
        started = time.monotonic()
        try:
            # Given a client that sends its head one byte every 0.1 s (each read well within
            # the deadline, the whole head some 15 s),
            for byte in head[:60]:  # 6 s at most
                if answer.done():
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(bytes([byte]))
                    await writer.drain()
                await asyncio.sleep(0.1)
            # then it is answered 408 and closed once NTORQUE_BODY_TIMEOUT has passed since
            # its first byte, not at its last.
            try:
                async with asyncio.timeout(5):
                    data = await answer
            except TimeoutError:
                raise AssertionError("the dribbled head was never answered") from None
            elapsed_s = time.monotonic() - started
        finally:
            answer.cancel()
            writer.close()
    response = parse_response(data)
    assert response.status == 408
    assert response.headers["connection"] == "close"
    assert response.headers["content-type"] == "application/json"
    assert response.json()["code"] == "head_timeout"
    assert 0.9 <= elapsed_s < 3, elapsed_s
    assert await count_tasks(store) == 0


@ONE_BACKEND
@pytest.mark.ntorque_env(NTORQUE_BODY_TIMEOUT="1.5")
async def test_heads_in_slow_pieces_within_the_deadline_are_served_on_a_kept_alive_connection(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    _, key = await store.create_app("in-time")
    async with serve_app(settings, store, notifier) as base:
        host, _, port = base.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head, body = task_request(host, key)
        statuses = []
        try:
            # A head in five reads over 1 s, then its body 1 s later: the head's deadline
            # ended with the head (its start is 2 s ago), the body's began there.
            await send_in_pieces(writer, head, pieces=5, gap_s=0.25)
            await asyncio.sleep(1)
            writer.write(body)
            statuses.append((await read_response(reader)).status)
            # A second slow head on the same connection has a deadline of its own.
            await send_in_pieces(writer, head + body, pieces=5, gap_s=0.25)
            statuses.append((await read_response(reader)).status)
            # A connection idle for longer than the deadline is not timed out by it.
            await asyncio.sleep(2)
            writer.write(head + body)
            statuses.append((await read_response(reader)).status)
            # Pipelined requests, the second head split over two reads.
            writer.write(head + body + head[:20])
            await asyncio.sleep(0.3)
            writer.write(head[20:] + body)
            statuses.append((await read_response(reader)).status)
            statuses.append((await read_response(reader)).status)
            # Idle with nothing sent, the connection is closed by uvicorn's keep-alive
            # timeout (5 s), without a word.
            async with asyncio.timeout(15):
                assert await reader.read() == b""
        finally:
            writer.close()
    assert statuses == [201] * 5
    assert await count_tasks(store) == 5


LONG_NAME = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters, the most DNS allows

MALFORMED_HOSTS = [
    "http://a..b/",
    "http://.../",
    "http://./hook",
    "http://.example.com/",
    "http://example.com../",
    "http://" + "a" * 64 + ".example/",
    f"http://x{LONG_NAME}/",
    "http://" + "\u00fc" * 60 + ".example/",  # its punycode label is over 63
]


async def test_malformed_hosts_are_refused_as_bad_url(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    """The hook client could never resolve these (its IDNA encoding fails): 400, no task."""
    _, key = await store.create_app("hosts")
    answers = {}
    async with serve_app(settings, store, notifier) as base:
        for url in MALFORMED_HOSTS:
            response = await raw_http(base, "POST", q(url), [("NTORQUE_API_KEY", key)], b"x")
            answers[url] = (response.status, response.json().get("code"))
    assert answers == {url: (400, "bad_url") for url in MALFORMED_HOSTS}
    assert await count_tasks(store) == 0


NOT_IPV4_HOSTS = [
    "http://1.2.3.4.5/",
    "http://999.1.1.1/",
    "http://127.1:9/hook",
    "http://2130706433/",
    "http://010.0.0.1/",
    "http://1.2.3.4./",
]


def make_task(url: str) -> Task:
    now = time.time()
    return Task(id=1, app_id=None, url=url, method="POST", timeout=5, body=b"",
                content_type=None, headers=[], trace_context=None, status="PENDING",
                retry_count=1, due=now, created=now, modified=now, last_status=None,
                last_error=None)  # fmt: skip


async def test_digit_hosts_that_are_not_ipv4_addresses_are_refused_as_bad_url(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    """The hook client would refuse these for ever (not a dotted quad): 400, no task."""
    _, key = await store.create_app("ipv4")
    client = AiohttpHookClient(settings)
    try:
        for url in NOT_IPV4_HOSTS:
            result = await client.call(make_task(url))
            assert result.permanent and "invalid url" in (result.error or ""), (url, result)
    finally:
        await client.close()
    answers = {}
    async with serve_app(settings, store, notifier) as base:
        for url in NOT_IPV4_HOSTS:
            response = await raw_http(base, "POST", q(url), [("NTORQUE_API_KEY", key)], b"x")
            answers[url] = (response.status, response.json().get("code"))
    assert answers == {url: (400, "bad_url") for url in NOT_IPV4_HOSTS}
    assert await count_tasks(store) == 0


async def test_url_not_utf8_once_percent_decoded_is_refused(
    settings: Settings, store: Store, notifier: Notifier
) -> None:
    """A url sent without encoding it (caf%E9 as Latin-1) is 400, not silently turned to U+FFFD."""
    _, key = await store.create_app("utf8")
    async with serve_app(settings, store, notifier) as base:
        for target in ("/?url=http://127.0.0.1:9/caf%E9", "/?url=http://127.0.0.1:9/?q=%FF+x"):
            response = await raw_http(base, "POST", target, [("NTORQUE_API_KEY", key)], b"x")
            assert response.status == 400, (target, response.body)
            assert response.json()["code"] == "bad_url"
        assert await count_tasks(store) == 0
        # A real U+FFFD, sent as its UTF-8 bytes, is a character like any other.
        target = "/?url=" + quote("http://127.0.0.1:9/\ufffd", safe="")
        response = await raw_http(base, "POST", target, [("NTORQUE_API_KEY", key)], b"x")
        assert response.status == 201, response.body
        assert response.json()["url"] == "http://127.0.0.1:9/\ufffd"


@pytest.mark.parametrize(
    ("raw_timeout", "words"),
    [
        ("3601", "at most 3600"),
        ("9" * 11, "at most 3600"),
        ("9" * 5000, "at most 3600"),
        ("0", "at least 1"),
        ("000", "at least 1"),
        ("-1", "whole number"),
        ("1.0", "whole number"),
        ("", "whole number"),
        ("%D9%A5", "whole number"),  # an Arabic-Indic five
    ],
)
async def test_a_bad_timeout_names_its_problem(
    settings: Settings, store: Store, notifier: Notifier, raw_timeout: str, words: str
) -> None:
    _, key = await store.create_app("timeout")
    async with serve_app(settings, store, notifier) as base:
        target = q(HOOK) + "&timeout=" + raw_timeout
        response = await raw_http(base, "POST", target, [("NTORQUE_API_KEY", key)], b"x")
        assert response.status == 400, response.body
        assert response.json()["code"] == "bad_timeout"
        assert words in response.json()["error"]
        # Leading zeros are still the number they spell.
        target = q(HOOK) + "&timeout=" + "0" * 20 + "7"
        response = await raw_http(base, "POST", target, [("NTORQUE_API_KEY", key)], b"x")
        assert response.status == 201, response.body
        assert response.json()["timeout"] == 7


async def test_host_names_and_addresses_the_hook_client_can_call_are_accepted(
    api: httpx.AsyncClient,
) -> None:
    urls = [
        "http://127.0.0.1:9/hook",
        "http://[::1]:8080/",
        "http://localhost/",
        "http://example.com./",
        "http://b\u00fccher.example/",
        "http://xn--bcher-kva.example/",
        f"http://{LONG_NAME}./",
    ]
    for url in urls:
        response = await api.post("/", params={"url": url}, content=b"x")
        assert response.status_code == 201, (url, response.text)


async def test_utf8_header_bytes_reach_the_hook_byte_for_byte(
    api: httpx.AsyncClient,
    settings: Settings,
    store: Store,
    notifier: Notifier,
    hook_server: HookServer,
) -> None:
    """A passthrough value and a Content-Type in UTF-8 are replayed as the very same bytes.

    (Starlette reads header bytes as Latin-1 and aiohttp writes header values as UTF-8: kept
    as the Latin-1 str, ``caf\xc3\xa9`` would reach the hook as ``caf\xc3\x83\xc2\xa9``.)
    """
    value = "caf\u00e9 \u4e16\u754c \U0001f600".encode()
    content_type = 'text/plain; charset=utf-8; name="gr\u00fc\u00dfe.txt"'.encode()
    response = await api.post(
        "/",
        params={"url": hook_server.url("/hook")},
        content=b"body",
        # httpx sends bytes header values as they are.
        headers={b"Content-Type": content_type, b"NTORQUE-PASSTHROUGH-X-B": value},
    )
    assert response.status_code == 201, response.text
    await run_until_settled(settings, store, notifier, [response.json()["id"]])

    [call] = hook_server.calls("/hook")
    # The hook server (aiohttp) decodes header bytes as UTF-8 with surrogateescape, which
    # encodes back to exactly the bytes on the wire.
    assert call.headers["X-B"].encode("utf-8", "surrogateescape") == value
    assert call.headers["Content-Type"].encode("utf-8", "surrogateescape") == content_type
    assert call.body == b"body"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({b"NTORQUE-PASSTHROUGH-X-B": b"caf\xe9"}, "bad_header"),
        ({b"Content-Type": b"text/plain; name=caf\xe9"}, "bad_content_type"),
    ],
)
async def test_header_bytes_neither_ascii_nor_utf8_are_refused(
    api: httpx.AsyncClient, store: Store, headers: dict[bytes, bytes], code: str
) -> None:
    """Latin-1 bytes could not be replayed as they are (the hook client sends UTF-8): 400."""
    response = await api.post("/", params={"url": HOOK}, content=b"x", headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == code
    assert await count_tasks(store) == 0
