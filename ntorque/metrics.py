"""Every Prometheus metric ntorque exports, named and bucketed in one place.

Labels stay bounded: app names, outcomes, status classes and roles, never a task id or URL.
Counters are declared without ``_total``: prometheus-client appends it on exposition.
"""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from . import __version__

# Enqueue and acquire are database round trips: milliseconds matter.
FAST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Hook calls run from a few ms up to the longest timeout users set (an hour).
HOOK_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
)
# Enqueue to completion includes retries and their backoff: milliseconds to a day.
E2E_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
    14400,
    86400,
)

OUTCOMES = ("completed", "failed", "retry")
FINAL_STATUSES = ("completed", "failed")
ROLES = ("web", "worker", "clock", "run")

# -- web --------------------------------------------------------------------------------
TASKS_ENQUEUED = Counter("ntorque_tasks_enqueued", "Tasks stored by POST /, by app.", ["app"])
ENQUEUE_SECONDS = Histogram(
    "ntorque_enqueue_duration_seconds",
    "From request received to task committed.",
    buckets=FAST_BUCKETS,
)
ENQUEUE_REJECTED = Counter(
    "ntorque_enqueue_rejected", "Enqueue requests refused as bad input, by reason.", ["reason"]
)
API_ERRORS = Counter(
    "ntorque_api_errors",
    "Requests answered with an error, by status and code: bad input, a bad key, no such task,"
    " the database unavailable (503), and requests the HTTP layer refused.",
    ["status", "code"],
)

# -- worker -----------------------------------------------------------------------------
TASKS_ACQUIRED = Counter("ntorque_tasks_acquired", "Attempts taken by workers.")
ACQUIRE_MISSES = Counter(
    "ntorque_acquire_misses", "Notified task ids that were not acquirable (not due or done)."
)
ACQUIRE_SECONDS = Histogram(
    "ntorque_acquire_duration_seconds", "One acquire statement.", buckets=FAST_BUCKETS
)
HOOK_SECONDS = Histogram(
    "ntorque_hook_duration_seconds",
    "One hook call, by outcome (completed/failed/retry) and status class (2xx.., error).",
    ["outcome", "status_class"],
    buckets=HOOK_BUCKETS,
)
ATTEMPTS = Counter(
    "ntorque_attempts", "Finished attempts (stale ones too), by outcome.", ["outcome"]
)
RETRIES = Counter("ntorque_retries", "Attempts whose retry was recorded: the task will run again.")
TASKS_COMPLETED = Counter("ntorque_tasks_completed", "Tasks completed: a success answer recorded.")
TASKS_FAILED = Counter(
    "ntorque_tasks_failed",
    "Tasks failed for good: a permanent answer, retries used up, or the last lease expired.",
)
STALE_OUTCOMES = Counter(
    "ntorque_stale_outcomes", "Outcomes dropped: a newer attempt held the task, or it had finished."
)
TASK_SECONDS = Histogram(
    "ntorque_task_duration_seconds",
    "From enqueue to the task's final outcome, by final status (completed/failed).",
    ["status"],
    buckets=E2E_BUCKETS,
)
HOOKS_IN_FLIGHT = Gauge(
    "ntorque_hooks_in_flight", "Hook calls running now.", multiprocess_mode="livesum"
)

# -- clock ------------------------------------------------------------------------------
DUE_TASKS = Gauge(
    "ntorque_due_tasks",
    "Pending tasks whose due time has passed (measured by the clock).",
    multiprocess_mode="mostrecent",
)
OLDEST_DUE_AGE = Gauge(
    "ntorque_oldest_due_age_seconds",
    "How long the oldest due task has waited (0 when none is due).",
    multiprocess_mode="mostrecent",
)
REQUEUED = Counter("ntorque_requeued", "Due tasks re-notified by the clock.")
CLEANED_UP = Counter("ntorque_cleaned_up", "Finished tasks deleted by the clock.")
EXHAUSTED = Counter("ntorque_exhausted", "Tasks failed because their last attempt's lease expired.")

# -- every role -------------------------------------------------------------------------
NOTIFY_FAILURES = Counter(
    "ntorque_notify_failures", "Notification channel errors (Redis down), by role.", ["role"]
)
DATABASE_ERRORS = Counter(
    "ntorque_database_errors",
    "Database calls that failed: unreachable, broken or no answer in time, by role.",
    ["role"],
)
PROCESS_INFO = Gauge(
    "ntorque_process_info",
    "1 for each running ntorque process, by role and version (absent when it is down).",
    ["role", "version"],
    multiprocess_mode="max",
)

# Which families each role exports: a web process must not claim a backlog of 0, nor a
# clock an enqueue rate. Process metrics (process_*, python_*) are exported by all.
ROLE_FAMILIES: dict[str, frozenset[str]] = {
    "web": frozenset(
        {
            "ntorque_tasks_enqueued",
            "ntorque_enqueue_duration_seconds",
            "ntorque_enqueue_rejected",
            "ntorque_api_errors",
            "ntorque_notify_failures",
            "ntorque_database_errors",
            "ntorque_process_info",
        }
    ),
    "worker": frozenset(
        {
            "ntorque_tasks_acquired",
            "ntorque_acquire_misses",
            "ntorque_acquire_duration_seconds",
            "ntorque_hook_duration_seconds",
            "ntorque_attempts",
            "ntorque_retries",
            "ntorque_tasks_completed",
            "ntorque_tasks_failed",
            "ntorque_stale_outcomes",
            "ntorque_task_duration_seconds",
            "ntorque_hooks_in_flight",
            "ntorque_notify_failures",
            "ntorque_database_errors",
            "ntorque_process_info",
        }
    ),
    "clock": frozenset(
        {
            "ntorque_due_tasks",
            "ntorque_oldest_due_age_seconds",
            "ntorque_requeued",
            "ntorque_cleaned_up",
            "ntorque_exhausted",
            "ntorque_tasks_failed",
            "ntorque_task_duration_seconds",
            "ntorque_notify_failures",
            "ntorque_database_errors",
            "ntorque_process_info",
        }
    ),
}


def exported_by(role: str, family: str) -> bool:
    """Whether ``role``'s exposition carries ``family`` (``run`` carries all of them)."""
    if not family.startswith("ntorque_") or role not in ROLE_FAMILIES:
        return True
    return family in ROLE_FAMILIES[role]


@functools.lru_cache(maxsize=4096)
def labelled(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, looked up once: each lookup takes a lock, per task."""
    return metric.labels(*values)


def api_error(status: int, code: str) -> None:
    """Count one error answer (codes are ntorque's own few: the labels stay bounded)."""
    labelled(API_ERRORS, str(status), code).inc()


def announce(role: str) -> None:
    """Mark this process alive and create its zero series, so rates start at the first event."""
    PROCESS_INFO.labels(role=role, version=__version__).set(1)
    NOTIFY_FAILURES.labels(role="web" if role == "run" else role)
    DATABASE_ERRORS.labels(role="web" if role == "run" else role)
    if role in ("web", "run"):
        # The answers an operator alerts on: a rate of 0 until the first one.
        API_ERRORS.labels(status="503", code="unavailable")
        API_ERRORS.labels(status="401", code="unauthorized")
    if role in ("worker", "run"):
        for outcome in OUTCOMES:
            ATTEMPTS.labels(outcome=outcome)
        for status in FINAL_STATUSES:
            TASK_SECONDS.labels(status=status)
    if role == "run":
        for other in ("worker", "clock"):
            NOTIFY_FAILURES.labels(role=other)
            DATABASE_ERRORS.labels(role=other)


def status_class(code: int | None) -> str:
    """A bounded label for a status code: ``2xx``..``5xx``, or ``error`` (no answer)."""
    return "error" if code is None else f"{code // 100}xx"
