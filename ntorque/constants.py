"""Every name of ntorque's outside contract, in one place."""

from typing import Final

# Task status values, as stored and as shown by the API.
PENDING: Final = "PENDING"
COMPLETED: Final = "COMPLETED"
FAILED: Final = "FAILED"
STATUSES: Final = (PENDING, COMPLETED, FAILED)

# Methods a hook may be called with.
METHODS: Final = ("POST", "PUT", "PATCH", "DELETE")

# Request headers read by the API.
API_KEY_HEADERS: Final = ("ntorque_api_key", "ntorque-api-key")
PASSTHROUGH_PREFIX: Final = "ntorque-passthrough-"

# Headers added to every hook call.
TASK_ID_HEADER: Final = "NTORQUE-TASK-ID"
RETRY_COUNT_HEADER: Final = "NTORQUE-TASK-RETRY-COUNT"
RETRY_LIMIT_HEADER: Final = "NTORQUE-TASK-RETRY-LIMIT"
TRACEPARENT_HEADER: Final = "traceparent"
TRACESTATE_HEADER: Final = "tracestate"

# Passthrough names that would break or hijack the hook request.
FORBIDDEN_PASSTHROUGH: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
        "expect",
        "content-type",
        "traceparent",
        "tracestate",
        TASK_ID_HEADER.lower(),
        RETRY_COUNT_HEADER.lower(),
        RETRY_LIMIT_HEADER.lower(),
    }
)

# Redis keys derived from NTORQUE_REDIS_CHANNEL.
METRICS_KEY_SUFFIX: Final = ":metrics"

USER_AGENT: Final = "ntorque"
