"""The bare hook server: a minimal ASGI app answering 200, recording when each task arrived.

Run as ``uvicorn bench.hookserver:app`` (uvloop + httptools, like ntorque web). Control
routes under ``/_bench/`` let the orchestrator read arrival times; ``time.monotonic`` is
the system-wide CLOCK_MONOTONIC on Linux, so times compare across processes.
"""

from __future__ import annotations

import json
import time
from typing import Any

# (monotonic arrival, task id) of every hook call that carried NTORQUE-TASK-ID.
arrivals: list[tuple[float, int]] = []
plain = {"count": 0}

OK_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
}
OK_BODY = {"type": "http.response.body", "body": b"ok"}


async def _json(send: Any, value: Any) -> None:
    body = json.dumps(value).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path.startswith("/_bench/"):
        if path == "/_bench/stats":
            ids = {i for _, i in arrivals}
            await _json(
                send,
                {
                    "calls": len(arrivals),
                    "unique": len(ids),
                    "first": arrivals[0][0] if arrivals else None,
                    "last": arrivals[-1][0] if arrivals else None,
                    "plain": plain["count"],
                },
            )
        elif path == "/_bench/arrivals":
            await _json(send, arrivals)
        else:  # /_bench/reset
            arrivals.clear()
            plain["count"] = 0
            await _json(send, {"ok": True})
        return
    task_id = None
    for name, value in scope["headers"]:
        if name == b"ntorque-task-id":
            task_id = int(value)
            break
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    if task_id is None:
        plain["count"] += 1
    else:
        arrivals.append((time.monotonic(), task_id))
    await send(OK_START)
    await send(OK_BODY)
