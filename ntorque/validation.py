"""Checking an enqueue request: every bad input becomes a 4xx with a message naming it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_plus, unquote_to_bytes

from starlette.requests import ClientDisconnect, Request

from .constants import FORBIDDEN_PASSTHROUGH, METHODS, PASSTHROUGH_PREFIX
from .deadlines import Deadline
from .hooks import check_url
from .settings import Settings

TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
DIGITS = re.compile(r"^[0-9]{1,10}$")
# Tabs are legal inside header values; other control characters (CR, LF, NUL) are not.
UNPRINTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
PASSTHROUGH_PREFIX_BYTES = PASSTHROUGH_PREFIX.encode("latin-1")
MAX_HEADER_VALUE = 8192
MAX_CONTENT_TYPE = 1024


class BadRequest(Exception):
    """The request cannot become a task."""

    def __init__(self, message: str, code: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


@dataclass(frozen=True, slots=True)
class TaskSpec:
    url: str
    host: str
    method: str
    timeout: int
    content_type: str | None
    headers: list[tuple[str, str]]


def _single(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise BadRequest(f"{name} is given more than once", f"bad_{name}")
    return values[0] if values else None


def task_from_request(request: Request, settings: Settings) -> TaskSpec:
    """Validate everything but the body."""
    # url, method and timeout (the url percent-encoded) fit well within this; more is junk.
    max_query = 3 * settings.max_url_length + 256
    if len(request.scope.get("query_string", b"")) > max_query:
        raise BadRequest(f"the query string is longer than {max_query} bytes", "bad_query")
    url = _single(request, "url")
    if url is None or url == "":
        raise BadRequest("the url query parameter is required", "bad_url")
    if "\ufffd" in url and _not_utf8(request, "url"):
        raise BadRequest(
            "url is not UTF-8 once percent-decoded (percent-encode the whole url)", "bad_url"
        )
    if len(url) > settings.max_url_length:
        raise BadRequest(f"url is longer than {settings.max_url_length} characters", "bad_url")
    problem, host = check_url(url)
    if problem is not None:
        raise BadRequest(f"url {problem}", "bad_url")

    raw_method = _single(request, "method")
    method = "POST" if raw_method is None else raw_method.strip().upper()
    if method not in METHODS:
        raise BadRequest(f"method must be one of {', '.join(METHODS)}", "bad_method")

    raw_timeout = _single(request, "timeout")
    timeout = settings.default_timeout_s
    if raw_timeout is not None:
        digits = raw_timeout.lstrip("0") or raw_timeout[:1]
        if not DIGITS.match(digits):
            if digits.isascii() and digits.isdigit():  # more digits than any limit has
                raise BadRequest(
                    f"timeout must be at most {settings.max_timeout_s} seconds", "bad_timeout"
                )
            raise BadRequest("timeout must be a whole number of seconds", "bad_timeout")
        timeout = int(digits)
        if timeout < 1:
            raise BadRequest("timeout must be at least 1 second", "bad_timeout")
        if timeout > settings.max_timeout_s:
            raise BadRequest(
                f"timeout must be at most {settings.max_timeout_s} seconds", "bad_timeout"
            )

    content_type = request.headers.get("content-type")
    if content_type is not None:
        if len(content_type) > MAX_CONTENT_TYPE or not _printable(content_type):
            raise BadRequest("the Content-Type header is malformed", "bad_content_type")
        if not content_type.isascii():
            # Starlette decoded the bytes as Latin-1; encoding back gives them unchanged.
            utf8 = _utf8(content_type.encode("latin-1"))
            if utf8 is None:
                raise BadRequest(
                    "the Content-Type header is neither ASCII nor UTF-8", "bad_content_type"
                )
            content_type = utf8

    return TaskSpec(
        url=url,
        host=host,
        method=method,
        timeout=timeout,
        content_type=content_type or None,
        headers=passthrough_headers(request, settings),
    )


def _not_utf8(request: Request, name: str) -> bool:
    """Whether a query parameter's percent-decoded bytes are not UTF-8.

    Starlette decodes such bytes to U+FFFD: a hook URL would silently change.
    """
    for field in request.scope.get("query_string", b"").decode("latin-1").split("&"):
        key, _, value = field.partition("=")
        if unquote_plus(key) == name:
            try:
                unquote_to_bytes(value.replace("+", " ")).decode("utf-8")
            except UnicodeDecodeError:
                return True
    return False


def passthrough_headers(request: Request, settings: Settings) -> list[tuple[str, str]]:
    """``NTORQUE-PASSTHROUGH-<Name>: v`` request headers, as ``<Name>: v`` pairs."""
    headers: list[tuple[str, str]] = []
    for raw_name, raw_value in request.headers.raw:
        # Compared as bytes: decoding every header's name costs more than the rest here.
        if not raw_name.lower().startswith(PASSTHROUGH_PREFIX_BYTES):
            continue
        target = raw_name.decode("latin-1").lower()[len(PASSTHROUGH_PREFIX) :]
        if not target or not TOKEN.match(target):
            raise BadRequest(f"passthrough header name {target!r} is not valid", "bad_header")
        if target in FORBIDDEN_PASSTHROUGH:
            raise BadRequest(
                f"passthrough header {target!r} is not allowed (it would break the request)",
                "bad_header",
            )
        # The hook client sends values as UTF-8: ASCII (the usual case) and UTF-8 values
        # reach the hook byte for byte, anything else would not.
        value = raw_value.decode("ascii") if raw_value.isascii() else _utf8(raw_value)
        if value is None:
            raise BadRequest(
                f"passthrough header {target!r} has a value that is neither ASCII nor UTF-8",
                "bad_header",
            )
        if len(raw_value) > MAX_HEADER_VALUE or not _printable(value):
            raise BadRequest(
                f"passthrough header {target!r} has a malformed or over-long value",
                "bad_header",
            )
        headers.append((target, value))
    if len(headers) > settings.max_passthrough_headers:
        raise BadRequest(
            f"at most {settings.max_passthrough_headers} passthrough headers are allowed",
            "bad_header",
        )
    return headers


def _printable(value: str) -> bool:
    return UNPRINTABLE.search(value) is None


def _utf8(raw: bytes) -> str | None:
    """Non-ASCII header bytes as the str the hook client will send back as the same bytes.

    aiohttp encodes header values as UTF-8, so only a value that is UTF-8 survives the trip
    byte for byte; anything else (Latin-1, say) would arrive re-encoded: None.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


async def read_body(request: Request, limit: int, deadline: Deadline) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` (never buffered whole).

    A body still incomplete at the ``deadline`` is refused with 408: a client that stalls
    mid-body would otherwise hold its connection (and this request) open for ever.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("the Content-Length header is malformed", "bad_content_length")
        if int(declared) > limit:
            raise BadRequest(f"the body is larger than {limit} bytes", "body_too_large", 413)
    chunks: list[bytes] = []
    size = 0
    try:
        async with deadline:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadRequest(
                        f"the body is larger than {limit} bytes", "body_too_large", 413
                    )
                chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest(
            "the client went away before the body arrived", "client_disconnect"
        ) from None
    except TimeoutError:
        raise BadRequest(
            f"the body did not arrive within {deadline.seconds:g} seconds", "body_timeout", 408
        ) from None
    return b"".join(chunks)
