"""check_url: what the hook client can call."""

from __future__ import annotations

import pytest

from ntorque.hooks import check_host, check_url


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


def url_problem(url: str) -> str | None:
    """The enqueue route's whole url check: check_url, then the host as the resolver needs it."""
    problem, host = check_url(url)
    return problem if problem is not None else check_host(host)


LONGEST_NAME = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5100/",
        "http://[::1]:8080/",
        "http://[2001:db8::1]/x",
        "http://[fe80::1%25eth0]/",
        "http://localhost/",
        "http://localhost:8000/hook",
        "http://example.com./",
        "http://a.b/",
        "http://my_host.internal/",  # underscores: not LDH, but resolvable (SRV, /etc/hosts)
        "http://" + "a" * 63 + ".com/",
        f"http://{LONGEST_NAME}/",
        f"http://{LONGEST_NAME}./",  # the trailing dot does not count
        "http://bücher.example/",
        "http://BÜCHER.example./",
        "http://xn--bcher-kva.example/",
        "https://münchen.de:8443/a?b=c",
        "http://ß.de/",
        "http://例え.テスト/",
    ],
)
def test_hosts_the_hook_client_can_resolve(url: str) -> None:
    assert url_problem(url) is None


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://a..b/", "empty label"),
        ("http://.../", "empty label"),
        ("http://./", "empty label"),
        ("http://.example.com/", "empty label"),
        ("http://example.com../", "empty label"),
        ("http://" + "a" * 64 + ".com/", "63"),
        ("http://example." + "a" * 64 + "/", "63"),
        ("http://" + "a" * 64 + "/", "63"),
        (f"http://x{LONGEST_NAME}/", "253"),
        (f"http://a.{LONGEST_NAME}./", "253"),
        ("http://bü." + "a" * 64 + "/", ""),  # refused by the URL parser already
        ("http://bü..example/", ""),
        ("http://" + "ü" * 60 + ".de/", ""),  # a punycode label over 63
        (
            "http://" + ".".join(["bü" + "a" * 50] * 5) + "/",
            "253",
        ),  # labels fit, the encoded name does not
        ("http://a\u2028b.de/", ""),
        ("http://xn--zz.com/", ""),  # a malformed punycode label
    ],
)
def test_hosts_the_hook_client_cannot_resolve_are_refused(url: str, words: str) -> None:
    problem = url_problem(url)
    assert problem is not None
    assert words in problem


@pytest.mark.parametrize(
    "host",
    [
        "1.2.3.4.5",
        "999.1.1.1",
        "1.2.3.256",
        "127.1",
        "2130706433",
        "010.0.0.1",
        "1.2.3.04",
        "1.2.3.4.",
        "1..2.3",
        "0",
    ],
)
def test_digits_and_dots_that_are_not_a_dotted_quad_are_refused(host: str) -> None:
    """The hook client takes such a host for an IPv4 address and refuses all but a quad."""
    problem = url_problem(f"http://{host}/hook")
    assert problem is not None
    assert "IPv4" in problem


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "255.255.255.255", "192.168.100.200"])
def test_dotted_quads_are_accepted(host: str) -> None:
    assert url_problem(f"http://{host}:8080/hook") is None


def test_the_ascii_host_rule_matches_the_idna_codec() -> None:
    """HOST_NAME (the fast path) refuses exactly what the codec refuses, plus over 253."""
    samples = [
        "a",
        "a.",
        ".",
        "..",
        "a..b",
        ".a",
        "a.b.",
        "a.b..",
        "a" * 63,
        "a" * 64,
        "a" * 63 + ".",
        "a" * 64 + ".",
        "x." + "a" * 63,
        "x." + "a" * 64,
        "1.2.3.4",
    ]
    for name in samples:
        try:
            name.encode("idna")
            codec_ok = True
        except UnicodeError:
            codec_ok = False
        assert (check_host(name) is None) == codec_ok, name
