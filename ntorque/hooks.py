"""Calling a hook, and what its answer means. The HTTP client library stays behind this seam."""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp
import yarl
from multidict import CIMultiDict

from . import __version__
from .backoff import backoff_s
from .constants import (
    COMPLETED,
    FAILED,
    PENDING,
    RETRY_COUNT_HEADER,
    RETRY_LIMIT_HEADER,
    TASK_ID_HEADER,
    USER_AGENT,
)
from .models import Outcome, Task
from .settings import Settings

Verdict = Literal["completed", "failed", "retry"]

# Errors are stored for the API to show; a hook's whole error page is not useful there.
MAX_ERROR_CHARS = 500
# What a text column cannot hold: NUL (PostgreSQL) and lone surrogates (neither database;
# aiohttp decodes a hook's non-UTF-8 header bytes, e.g. a Location, to surrogates). One
# such error would fail the whole batch of outcomes it is recorded with.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# Redirects the hook client follows itself (aiohttp's own would turn a POST answered by 301
# or 302 into a GET without its body: the hook would "succeed" without its payload). 303
# See Other says the request was handled: its answer is fetched with a GET, as RFC 9110
# intends; every other redirect resends the same method, headers and body.
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Not sent on to another host (as browsers, requests and aiohttp do); an upgrade of the
# same host from http to https keeps them.
CREDENTIAL_HEADERS = ("Authorization", "Cookie", "Proxy-Authorization")
# The task's timeout bounds the whole call (asyncio.timeout): no per-request limits.
NO_CLIENT_TIMEOUT = aiohttp.ClientTimeout()
# A pooled keep-alive connection the hook's server closed as it was reused breaks before
# any answer. aiohttp sends an idempotent method (aiohttp.client.IDEMPOTENT_METHODS) once
# more on a fresh connection; hooks are idempotent by contract, so the hook client does the
# same for POST and PATCH rather than spend an attempt (and a backoff) on the race with the
# server's keep-alive timeout.
RESENT_BY_AIOHTTP = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


@dataclass(frozen=True, slots=True)
class HookResult:
    status_code: int | None
    error: str | None
    duration_s: float
    body_prefix: bytes = b""
    permanent: bool = False  # an error no retry can mend (e.g. a redirect loop)


class HookClient(Protocol):
    async def call(self, task: Task, extra_headers: Sequence[tuple[str, str]] = ()) -> HookResult:
        """Call the task's hook once; never raises for anything the hook or network does.

        The call ends within the task's timeout of the attempt's acquisition
        (``task.modified``): the lease set then must outlast it.
        """

    async def close(self) -> None: ...


def classify(result: HookResult, transient: frozenset[int]) -> Verdict:
    """The outcome rules of SPEC §4, as one pure function."""
    code = result.status_code
    if code is None:
        return "failed" if result.permanent else "retry"
    if code in (200, 201):
        return "completed"
    if code >= 500 or code in transient:
        return "retry"
    return "failed"


def decide(
    task: Task, result: HookResult, settings: Settings, now: float
) -> tuple[Verdict, Outcome]:
    """Turn one attempt's result into the outcome to record (fenced on ``task.retry_count``)."""
    verdict = classify(result, settings.transient_request_errors)
    status = {"completed": COMPLETED, "failed": FAILED, "retry": PENDING}[verdict]
    due = now
    if verdict == "retry":
        if task.retry_count > settings.max_retries:
            # A retryable answer on the last allowed attempt: not retried, the task failed.
            verdict, status = "failed", FAILED
        else:
            due = now + backoff_s(
                task.retry_count,
                strategy=settings.backoff,
                min_delay_s=settings.min_due_delay_s,
                max_delay_s=settings.max_due_delay_s,
            )
    error = result.error
    if error is None and verdict != "completed" and result.status_code is not None:
        error = f"HTTP {result.status_code}"
    return verdict, Outcome(
        task_id=task.id,
        attempt=task.retry_count,
        status=status,
        due=due,
        status_code=result.status_code,
        error=None if error is None else UNSTORABLE.sub(_escape, error)[:MAX_ERROR_CHARS],
    )


def _escape(match: re.Match[str]) -> str:
    """An unstorable character as an escape; a byte surrogateescape kept as ``\\xff``."""
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def task_headers(task: Task, settings: Settings) -> list[tuple[str, str]]:
    """The headers of a hook call: Content-Type, passthrough, then ntorque's own."""
    headers: list[tuple[str, str]] = []
    if task.content_type:
        headers.append(("Content-Type", task.content_type))
    headers.extend(task.headers)
    headers.append((TASK_ID_HEADER, str(task.id)))
    # retry_count was incremented when this attempt was acquired: the first attempt is 0.
    headers.append((RETRY_COUNT_HEADER, str(max(task.retry_count - 1, 0))))
    headers.append((RETRY_LIMIT_HEADER, str(settings.max_retries)))
    return headers


class AiohttpHookClient:
    """Hook calls over one shared aiohttp session (chosen on measurements: see bench/)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.settings.ca_bundle)
        if self.settings.ca_bundle:
            # A custom bundle adds to the system's trust, it does not replace it.
            context.load_default_certs()
        return context

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=max(self.settings.worker_concurrency, 10),
                limit_per_host=0,
                ssl=self._ssl_context(),
                ttl_dns_cache=60,
                enable_cleanup_closed=True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                headers={"User-Agent": f"{USER_AGENT}/{__version__}"},
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def call(self, task: Task, extra_headers: Sequence[tuple[str, str]] = ()) -> HookResult:
        session = self._get_session()
        headers = CIMultiDict(task_headers(task, self.settings))
        headers.extend(extra_headers)
        started = time.perf_counter()
        # The lease (due = acquired + timeout + backoff) was counted from the acquisition,
        # not from now: a call started late (a busy loop, a slow BLMPOP) gets what is left,
        # so no retry of the task can start while this call may still be running.
        budget_s = min(task.timeout, task.modified + task.timeout - time.time())
        try:
            async with (
                asyncio.timeout(max(budget_s, 0.0)),
                await self._follow(session, task, headers) as response,
            ):
                prefix = await response.content.read(self.settings.max_response_bytes)
                return HookResult(
                    status_code=response.status,
                    error=None,
                    duration_s=time.perf_counter() - started,
                    body_prefix=prefix,
                )
        except aiohttp.ClientResponseError as exc:
            # Raised by the response parser (no status was read): its message, one line.
            return _error(started, f"invalid response: {' '.join(exc.message.split())}")
        except TooManyRedirects:
            return _error(started, "too many redirects", permanent=True)
        except aiohttp.InvalidURL as exc:
            return _error(started, f"invalid url: {exc}", permanent=True)
        except TimeoutError:
            return _error(started, f"timed out after {task.timeout}s")
        except aiohttp.ClientError as exc:
            return _error(started, f"{type(exc).__name__}: {exc}")
        except (OSError, ValueError) as exc:
            return _error(started, f"{type(exc).__name__}: {exc}")

    async def _follow(
        self, session: aiohttp.ClientSession, task: Task, headers: CIMultiDict[str]
    ) -> aiohttp.ClientResponse:
        """Send the request, following redirects (see REDIRECTS); the final response."""
        method = task.method
        body: bytes | None = task.body
        url: str | yarl.URL = task.url
        skip = ("Content-Type",) if not task.content_type else ()
        for redirects in range(self.settings.max_redirects + 1):
            resend = method not in RESENT_BY_AIOHTTP
            while True:
                try:
                    response = await session.request(
                        method,
                        url,
                        data=body,
                        headers=headers,
                        skip_auto_headers=skip,
                        timeout=NO_CLIENT_TIMEOUT,
                        allow_redirects=False,
                    )
                    break
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                    # Not a failure to connect: the connection broke before an answer.
                    if not resend or isinstance(exc, aiohttp.ClientConnectorError):
                        raise
                    resend = False
            location = response.headers.get("Location")
            if response.status not in REDIRECTS or location is None:
                return response
            if self.settings.max_redirects == 0:
                return response  # following none: the 3xx is the hook's answer
            response.release()
            if redirects == self.settings.max_redirects:
                break
            previous = response.url
            try:
                target = previous.join(yarl.URL(location))
            except (ValueError, TypeError) as exc:
                raise aiohttp.InvalidURL(location, f"bad redirect: {exc}") from exc
            if target.scheme not in ("http", "https") or not target.host:
                raise aiohttp.InvalidURL(location, "redirect to a non-http(s) URL")
            if not _same_authority(previous, target):
                for name in CREDENTIAL_HEADERS:
                    headers.popall(name, None)
            if response.status == 303:
                # See Other: the request was handled; its answer is read with a GET.
                method, body, skip = "GET", None, ("Content-Type",)
                headers.popall("Content-Type", None)
            url = target
        raise TooManyRedirects

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class TooManyRedirects(Exception):
    """More redirects than NTORQUE_MAX_REDIRECTS."""


def _same_authority(previous: yarl.URL, target: yarl.URL) -> bool:
    """Whether credentials may follow a redirect: same origin, or its upgrade to https."""
    if previous.origin() == target.origin():
        return True
    return (
        previous.scheme == "http"
        and target.scheme == "https"
        and previous.host == target.host
        and previous.port == 80
        and target.port == 443
    )


def _error(started: float, message: str, *, permanent: bool = False) -> HookResult:
    return HookResult(
        status_code=None,
        error=message,
        duration_s=time.perf_counter() - started,
        permanent=permanent,
    )


_SPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")
# A host name as the hook client needs it: its resolver hands the name to socket.getaddrinfo,
# which encodes it with the 'idna' codec, and that refuses an empty label (a trailing dot
# aside) or one over 63 characters. DNS adds the 253-character limit (without the dot).
# The codec's ASCII path checks nothing else, so neither does this.
HOST_NAME = re.compile(r"(?=.{1,253}\.?\Z)(?:[^.]{1,63}\.)*[^.]{1,63}\.?\Z")


def check_url(url: str) -> tuple[str | None, str]:
    """Whether the hook client can call ``url``: (problem or None, host)."""
    if _SPACE_OR_CONTROL.search(url):
        return "must not contain spaces or control characters", ""
    try:
        parsed = yarl.URL(url)
        host = parsed.host
        port = parsed.port
    except (ValueError, TypeError, UnicodeError):
        return "is not a valid URL", ""
    if not parsed.is_absolute() or parsed.scheme not in ("http", "https"):
        return "must be an absolute http:// or https:// URL", ""
    if not host:
        return "must name a host", ""
    if port is not None and not 0 < port < 65536:
        return "has an invalid port", ""
    return check_host(host), host


def check_host(host: str) -> str | None:
    """What is wrong with the url's host for the hook client (see HOST_NAME), or None."""
    if host.isascii():
        if ":" in host:  # an IPv6 literal
            return None
        if host.replace(".", "").isdigit():
            # The hook client takes a host of digits and dots for an IPv4 address and calls
            # only the dotted-quad form (no 127.1, 2130706433, 010.0.0.1, 999.1.1.1).
            return None if _is_dotted_quad(host) else "has a host that is not a valid IPv4 address"
        if HOST_NAME.match(host):
            return None
        name = host
    else:
        # An internationalised name: the hook client sends it IDNA-encoded.
        try:
            name = host.encode("idna").decode("ascii")
        except UnicodeError:
            return "has a host the IDNA codec cannot encode"
        if HOST_NAME.match(name):
            return None
    if len(name.removesuffix(".")) > 253:
        return "has a host longer than 253 characters"
    if any(len(label) > 63 for label in name.split(".")):
        return "has a host label longer than 63 characters"
    return "has a host with an empty label"


def _is_dotted_quad(host: str) -> bool:
    parts = host.split(".")
    return len(parts) == 4 and all(
        1 <= len(part) <= 3 and (part == "0" or not part.startswith("0")) and int(part) <= 255
        for part in parts
    )


def create_hook_client(settings: Settings) -> HookClient:
    return AiohttpHookClient(settings)
