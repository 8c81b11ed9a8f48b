"""Passthrough headers: which names and values become headers of the hook call."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from ntorque.validation import BadRequest, passthrough_headers
from tests.support import make_settings


def request_with(*headers: tuple[bytes, bytes]) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/", "headers": list(headers)})


def test_prefixed_headers_pass_through_in_order_others_do_not() -> None:
    request = request_with(
        (b"content-type", b"application/json"),
        (b"ntorque-passthrough-x-request-id", b"abc\tdef"),  # a tab is legal in a value
        (b"NTORQUE-PASSTHROUGH-Accept", b"text/plain; caf\xe9"),  # latin-1, any case
        (b"x-passthrough-nope", b"1"),
        (b"ntorque-passthrough-x-request-id", b"second"),
    )
    assert passthrough_headers(request, make_settings()) == [
        ("x-request-id", "abc\tdef"),
        ("accept", "text/plain; caf\xe9"),
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
