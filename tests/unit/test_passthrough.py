"""Passthrough headers: which names and values become headers of the hook call."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from ntorque.validation import BadRequest, passthrough_headers, task_from_request
from tests.support import make_settings


def request_with(*headers: tuple[bytes, bytes]) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/", "headers": list(headers)})


def test_prefixed_headers_pass_through_in_order_others_do_not() -> None:
    request = request_with(
        (b"content-type", b"application/json"),
        (b"ntorque-passthrough-x-request-id", b"abc\tdef"),  # a tab is legal in a value
        (b"NTORQUE-PASSTHROUGH-Accept", b"text/plain; caf\xc3\xa9"),  # UTF-8, any case
        (b"x-passthrough-nope", b"1"),
        (b"ntorque-passthrough-x-request-id", b"second"),
    )
    assert passthrough_headers(request, make_settings()) == [
        ("x-request-id", "abc\tdef"),
        ("accept", "text/plain; caf\u00e9"),
        ("x-request-id", "second"),
    ]


@pytest.mark.parametrize("value", [b"a\x00b", b"a\rb", b"a\nb", b"a\x1fb", b"a\x7fb", b"\x01"])
def test_control_characters_in_a_value_are_refused(value: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        passthrough_headers(request_with((b"ntorque-passthrough-x-a", value)), make_settings())
    assert caught.value.code == "bad_header"


@pytest.mark.parametrize(
    "name", [b"ntorque-passthrough-", b"ntorque-passthrough-host", b"ntorque-passthrough-a b"]
)
def test_empty_forbidden_or_malformed_names_are_refused(name: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        passthrough_headers(request_with((name, b"v")), make_settings())
    assert caught.value.code == "bad_header"


@pytest.mark.parametrize(
    "raw",
    [
        b"caf\xc3\xa9",
        "\u4e16\u754c \u2014 \U0001f600".encode(),
        b"\xc2\x85",
        b"x" * 8000 + b"\xc3\xa9",
    ],
)
def test_utf8_values_are_kept_as_the_str_the_hook_client_encodes_back(raw: bytes) -> None:
    # The hook client (aiohttp) encodes header values as UTF-8: the hook gets ``raw``.
    [(name, value)] = passthrough_headers(
        request_with((b"ntorque-passthrough-x-b", raw)), make_settings()
    )
    assert name == "x-b"
    assert value.encode("utf-8") == raw


@pytest.mark.parametrize(
    "raw",
    [
        b"caf\xe9",  # Latin-1
        b"\xff\xfe",
        b"\xc3",  # truncated UTF-8
        b"\xc0\xaf",  # overlong
        b"\xed\xa0\x80",  # a surrogate
        b"ok \x80",
    ],
)
def test_values_neither_ascii_nor_utf8_are_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        passthrough_headers(request_with((b"ntorque-passthrough-x-b", raw)), make_settings())
    assert caught.value.code == "bad_header"
    assert "UTF-8" in caught.value.message


def enqueue_request(*headers: tuple[bytes, bytes]) -> Request:
    return Request(
        {
            "type": "http",
            "method": "POST",
            "path": "/",
            "query_string": b"url=http%3A%2F%2F127.0.0.1%3A9%2Fhook",
            "headers": list(headers),
        }
    )


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        (b"application/json", "application/json"),
        (b"text/plain; charset=utf-8", "text/plain; charset=utf-8"),
        (b'text/plain; name="caf\xc3\xa9"', 'text/plain; name="caf\u00e9"'),
    ],
)
def test_content_type_is_ascii_or_utf8(raw: bytes, stored: str) -> None:
    spec = task_from_request(enqueue_request((b"content-type", raw)), make_settings())
    assert spec.content_type == stored
    assert stored.encode("utf-8") == raw, "the hook client sends these very bytes"


@pytest.mark.parametrize("raw", [b'text/plain; name="caf\xe9"', b"text/\xff", b"a/b\x01"])
def test_content_type_neither_ascii_nor_utf8_is_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        task_from_request(enqueue_request((b"content-type", raw)), make_settings())
    assert caught.value.code == "bad_content_type"
