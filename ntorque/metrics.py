"""Every Prometheus metric ntorque exports, named and bucketed in one place.

Labels stay bounded: app names, outcomes, status classes and roles, never a task id or URL.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
# Enqueue to completion includes retries: seconds to days.
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

TASKS_ENQUEUED = Counter("ntorque_tasks_enqueued", "Tasks stored by POST /.", ["app"])
ENQUEUE_SECONDS = Histogram(
    "ntorque_enqueue_duration_seconds",
    "From request received to task committed.",
    buckets=FAST_BUCKETS,
)
ENQUEUE_REJECTED = Counter(
    "ntorque_enqueue_rejected", "Enqueue requests refused, by reason.", ["reason"]
)
TASKS_ACQUIRED = Counter("ntorque_tasks_acquired", "Attempts taken by workers.")
ACQUIRE_MISSES = Counter(
    "ntorque_acquire_misses", "Notified task ids that were not acquirable (not due or done)."
)
ACQUIRE_SECONDS = Histogram(
    "ntorque_acquire_duration_seconds", "One acquire statement.", buckets=FAST_BUCKETS
)
HOOK_SECONDS = Histogram(
    "ntorque_hook_duration_seconds",
    "One hook call, by outcome and status class.",
    ["outcome", "status_class"],
    buckets=HOOK_BUCKETS,
)
ATTEMPTS = Counter("ntorque_attempts", "Finished attempts, by outcome.", ["outcome"])
RETRIES = Counter("ntorque_retries", "Attempts that will be retried.")
STALE_OUTCOMES = Counter(
    "ntorque_stale_outcomes", "Outcomes dropped because a newer attempt held the lease."
)
TASK_SECONDS = Histogram(
    "ntorque_task_duration_seconds",
    "From enqueue to the task's final outcome (completed or failed).",
    ["status"],
    buckets=E2E_BUCKETS,
)
HOOKS_IN_FLIGHT = Gauge("ntorque_hooks_in_flight", "Hook calls running now.")
DUE_TASKS = Gauge("ntorque_due_tasks", "Pending tasks whose due time has passed.")
OLDEST_DUE_AGE = Gauge("ntorque_oldest_due_age_seconds", "How long the oldest due task has waited.")
REQUEUED = Counter("ntorque_requeued", "Due tasks re-notified by the clock.")
CLEANED_UP = Counter("ntorque_cleaned_up", "Finished tasks deleted by the clock.")
EXHAUSTED = Counter("ntorque_exhausted", "Tasks failed because their last attempt's lease expired.")
NOTIFY_FAILURES = Counter(
    "ntorque_notify_failures", "Notification channel errors (Redis down), by role.", ["role"]
)


def status_class(code: int | None) -> str:
    return "error" if code is None else f"{code // 100}xx"
