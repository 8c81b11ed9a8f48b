"""The Heroku route's publications in Redis: one process per dyno name, the newest."""

from __future__ import annotations

import json

import pytest
import redis

from ntorque import observe
from tests import support

pytestmark = [pytest.mark.redis]


def _entry(channel: str, dyno: str) -> dict[str, object]:
    client = redis.Redis(host=support.REDIS_HOST, port=support.REDIS_PORT, socket_timeout=5)
    try:
        raw = client.get(f"{channel}:metrics:{dyno}")
    finally:
        client.close()
    return {} if raw is None else dict(json.loads(raw))


async def test_a_restarted_dyno_supersedes_its_old_process(
    redis_channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the old and the new process of a restarted dyno, both alive for a while
    # (the old one's grace period, or preboot), publishing under the same name,
    monkeypatch.setenv("DYNO", "worker.1")
    settings = support.make_settings(
        REDIS_URL=support.REDIS_URL, NTORQUE_REDIS_CHANNEL=redis_channel
    )
    old = observe.Publisher(settings, "worker")
    new = observe.Publisher(settings, "worker")
    try:
        await old.publish_once()
        await new.publish_once()
        newest = _entry(redis_channel, "worker.1")
        # when the old one publishes again,
        await old.publish_once()
        # then the entry stays the new process's: counters do not go back and forth,
        assert _entry(redis_channel, "worker.1") == newest
        # and the old one's clean stop leaves the new one's entry in place.
        await old.withdraw()
        assert _entry(redis_channel, "worker.1") == newest
        assert await observe._read_entries(settings) == [newest]
        await new.withdraw()
        assert _entry(redis_channel, "worker.1") == {}
    finally:
        for publisher in (old, new):
            await publisher._client.aclose()
