"""check_url: what the hook client can call."""

from __future__ import annotations

import pytest

from ntorque.hooks import check_url


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://example.com/hook", "example.com"),
        ("https://example.com:8443/a?b=c", "example.com"),
        ("http://127.0.0.1:5100/", "127.0.0.1"),
        ("http://[::1]:8080/x", "::1"),
        ("HTTP://Example.COM/", "example.com"),
    ],
)
def test_good_urls(url: str, host: str) -> None:
    problem, got = check_url(url)
    assert problem is None
    assert got == host


@pytest.mark.parametrize(
    "url",
    [
        "/relative",
        "example.com/path",
        "ftp://example.com/",
        "javascript:alert(1)",
        "file:///etc/passwd",
        "http:///nohost",
        "http://",
        "http://exa mple.com/",
        "http://example.com/\x00",
        "http://example.com/\r\nX: y",
        "http://example.com/\x7f",
        "http://example.com:99999/",
        "http://example.com:abc/",
        "gopher://example.com/",
        "",
    ],
)
def test_bad_urls(url: str) -> None:
    problem, _ = check_url(url)
    assert problem is not None
