"""The outcome rules (classify/decide) and the headers of a hook call, as pure functions."""

from __future__ import annotations

import pytest

from ntorque.constants import COMPLETED, FAILED, PENDING
from ntorque.hooks import MAX_ERROR_CHARS, HookResult, classify, decide, task_headers
from ntorque.models import Task
from tests.support import make_settings

TRANSIENT = frozenset({408, 423, 429, 449})


def result(code: int | None, error: str | None = None, permanent: bool = False) -> HookResult:
    return HookResult(status_code=code, error=error, duration_s=0.01, permanent=permanent)


def task(retry_count: int = 1, **kw: object) -> Task:
    values: dict[str, object] = {
        "id": 7,
        "app_id": None,
        "url": "http://127.0.0.1/h",
        "method": "POST",
        "timeout": 5,
        "body": b"",
        "content_type": None,
        "headers": [],
        "trace_context": None,
        "status": PENDING,
        "retry_count": retry_count,
        "due": 0.0,
        "created": 0.0,
        "modified": 0.0,
        "last_status": None,
        "last_error": None,
    }
    values.update(kw)
    return Task(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (200, "completed"),
        (201, "completed"),
        (202, "failed"),
        (203, "failed"),
        (204, "failed"),
        (301, "failed"),
        (304, "failed"),
        (400, "failed"),
        (401, "failed"),
        (404, "failed"),
        (410, "failed"),
        (499, "failed"),
        (408, "retry"),
        (423, "retry"),
        (429, "retry"),
        (449, "retry"),
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
        (504, "retry"),
        (599, "retry"),
        (None, "retry"),
    ],
)
def test_classify_table(code: int | None, verdict: str) -> None:
    assert classify(result(code, None if code else "boom"), TRANSIENT) == verdict


def test_custom_transient_codes_replace_the_defaults() -> None:
    custom = frozenset({418})
    assert classify(result(418), custom) == "retry"
    assert classify(result(429), custom) == "failed"


def test_permanent_network_errors_fail() -> None:
    assert classify(result(None, "too many redirects", permanent=True), TRANSIENT) == "failed"


def test_decide_completed_keeps_attempt_and_code() -> None:
    settings = make_settings()
    verdict, outcome = decide(task(retry_count=3), result(201), settings, now=1000.0)
    assert verdict == "completed"
    assert (outcome.status, outcome.attempt, outcome.status_code, outcome.error) == (
        COMPLETED,
        3,
        201,
        None,
    )


@pytest.mark.parametrize(
    ("strategy", "attempt", "expected_delay"),
    [
        ("exponential", 1, 0.5),
        ("exponential", 2, 1.0),
        ("exponential", 3, 2.0),
        ("exponential", 4, 3.0),  # capped by NTORQUE_MAX_DUE_DELAY
        ("linear", 1, 0.5),
        ("linear", 2, 1.0),
        ("linear", 3, 1.5),
        ("linear", 6, 3.0),
    ],
)
def test_decide_retry_sets_due_by_backoff(
    strategy: str, attempt: int, expected_delay: float
) -> None:
    settings = make_settings(
        NTORQUE_BACKOFF=strategy,
        NTORQUE_MIN_DUE_DELAY="0.5",
        NTORQUE_MAX_DUE_DELAY="3",
        NTORQUE_MAX_RETRIES="10",
    )
    verdict, outcome = decide(task(retry_count=attempt), result(503), settings, now=1000.0)
    assert verdict == "retry"
    assert outcome.status == PENDING
    assert outcome.due == pytest.approx(1000.0 + expected_delay)
    assert outcome.error == "HTTP 503"


def test_decide_last_attempt_fails_instead_of_retrying() -> None:
    settings = make_settings(NTORQUE_MAX_RETRIES="2")
    # retry_count 3 is the third attempt: 2 retries used up.
    verdict, outcome = decide(task(retry_count=3), result(500), settings, now=1.0)
    assert outcome.status == FAILED
    assert verdict == "failed"
    verdict, outcome = decide(task(retry_count=2), result(500), settings, now=1.0)
    assert outcome.status == PENDING
    assert verdict == "retry"


def test_decide_fail_codes_record_http_error() -> None:
    _, outcome = decide(task(), result(404), make_settings(), now=1.0)
    assert (outcome.status, outcome.error) == (FAILED, "HTTP 404")


def test_decide_truncates_long_errors() -> None:
    _, outcome = decide(task(), result(None, "x" * 10_000), make_settings(), now=1.0)
    assert outcome.error is not None and len(outcome.error) == MAX_ERROR_CHARS


def test_task_headers_first_attempt_counts_zero() -> None:
    settings = make_settings(NTORQUE_MAX_RETRIES="9")
    headers = task_headers(
        task(retry_count=1, content_type="text/plain; charset=utf-8", headers=[("X-A", "1")]),
        settings,
    )
    assert headers == [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("X-A", "1"),
        ("NTORQUE-TASK-ID", "7"),
        ("NTORQUE-TASK-RETRY-COUNT", "0"),
        ("NTORQUE-TASK-RETRY-LIMIT", "9"),
    ]
    later = dict(task_headers(task(retry_count=4), settings))
    assert later["NTORQUE-TASK-RETRY-COUNT"] == "3"
    assert "Content-Type" not in later
