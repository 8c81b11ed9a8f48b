"""The values passed between web, store, worker and hooks."""

from __future__ import annotations

import dataclasses
import functools
import json
from datetime import UTC, datetime
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class NewTask:
    url: str
    method: str
    timeout: int
    body: bytes
    content_type: str | None
    headers: list[tuple[str, str]]
    app_id: int | None
    trace_context: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    id: int
    app_id: int | None
    url: str
    method: str
    timeout: int
    body: bytes
    content_type: str | None
    headers: list[tuple[str, str]]
    trace_context: str | None
    status: str
    retry_count: int
    due: float
    created: float
    modified: float
    last_status: int | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: Any) -> Task:
        """From an SQLAlchemy row."""
        return cls.from_mapping(row._mapping)

    @classmethod
    def from_mapping(cls, m: Any) -> Task:
        """From anything indexable by column name (a row mapping, an asyncpg record)."""
        return cls(
            id=m["id"],
            app_id=m["app_id"],
            url=m["url"],
            method=m["method"],
            timeout=m["timeout"],
            body=bytes(m["body"]),
            content_type=m["content_type"],
            headers=[(str(k), str(v)) for k, v in json.loads(m["headers"] or "[]")],
            trace_context=m["trace_context"],
            status=m["status"],
            retry_count=m["retry_count"],
            due=m["due"],
            created=m["created"],
            modified=m["modified"],
            last_status=m["last_status"],
            last_error=m["last_error"],
        )

    def to_json(self) -> dict[str, Any]:
        """The task as the API shows it (no body, no headers: those may carry secrets)."""
        return {
            "id": self.id,
            "url": self.url,
            "method": self.method,
            "status": self.status,
            "retry_count": self.retry_count,
            "timeout": self.timeout,
            "due": iso(self.due),
            "created": iso(self.created),
            "modified": iso(self.modified),
            "last_status_code": self.last_status,
            "last_error": self.last_error,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt ended in. ``attempt`` is the retry_count the attempt was acquired with."""

    task_id: int
    attempt: int
    status: str  # the task's new status: PENDING (retry), COMPLETED or FAILED
    due: float
    status_code: int | None
    error: str | None


# A new task's due, created and modified are one instant, shared by its whole group-commit
# batch: formatting it once per batch is a measurable part of an enqueue's CPU (bench/).
@functools.lru_cache(maxsize=1024)
def iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat()
