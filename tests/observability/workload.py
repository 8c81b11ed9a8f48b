"""A workload with successes, failures and retries, and what the metrics must then say."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import httpx

from tests.support import HookServer, Reply


@dataclasses.dataclass
class Sent:
    ok: list[int] = dataclasses.field(default_factory=list)  # 200 at once
    failed: list[int] = dataclasses.field(default_factory=list)  # 404: failed, no retry
    retried: list[int] = dataclasses.field(default_factory=list)  # 500, then 200
    rejected: int = 0

    @property
    def ids(self) -> list[int]:
        return self.ok + self.failed + self.retried

    @property
    def attempts(self) -> int:
        return len(self.ok) + len(self.failed) + 2 * len(self.retried)


async def enqueue(api: httpx.AsyncClient, url: str) -> int:
    response = await api.post("/", params={"url": url}, content=b"payload")
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


async def send(
    api: httpx.AsyncClient, hooks: HookServer, *, ok: int, failed: int, retried: int, tag: str = ""
) -> Sent:
    """Enqueue the tasks (and one bad request); return their ids by expected fate."""
    sent = Sent()
    ok_url = hooks.script(f"/ok{tag}", 200)
    gone_url = hooks.script(f"/gone{tag}", Reply(status=404))
    for _ in range(ok):
        sent.ok.append(await enqueue(api, ok_url))
    for _ in range(failed):
        sent.failed.append(await enqueue(api, gone_url))
    for i in range(retried):
        # A path per task: its own script answers 500 once, then 200.
        sent.retried.append(await enqueue(api, hooks.script(f"/flaky{tag}/{i}", 500, 200)))
    bad = await api.post("/", params={"url": "not-a-url"})
    assert bad.status_code == 400
    sent.rejected += 1
    return sent


async def settle(api: httpx.AsyncClient, ids: list[int], timeout_s: float = 60) -> dict[int, dict]:
    """Poll GET /tasks/<id> until every task is COMPLETED or FAILED."""
    deadline = time.monotonic() + timeout_s
    tasks: dict[int, dict] = {}
    for _ in range(int(timeout_s / 0.1) + 1):
        for task_id in ids:
            if tasks.get(task_id, {}).get("status") in ("COMPLETED", "FAILED"):
                continue
            response = await api.get(f"/tasks/{task_id}")
            assert response.status_code == 200
            tasks[task_id] = response.json()
        if all(t["status"] != "PENDING" for t in tasks.values()):
            return tasks
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    pending = [i for i, t in tasks.items() if t["status"] == "PENDING"]
    raise AssertionError(f"tasks {pending} still PENDING after {timeout_s}s")
