"""Retry delays: pure functions of the retry number and the configuration."""

from __future__ import annotations

from typing import Literal

Strategy = Literal["exponential", "linear"]


def backoff_s(retry: int, *, strategy: Strategy, min_delay_s: float, max_delay_s: float) -> float:
    """Delay before the ``retry``-th retry (1-based): ``min·2^(k-1)`` or ``min·k``, capped."""
    k = max(retry, 1)
    # Past 2^64 the cap has long been reached; the min() avoids float overflow on huge k.
    delay = min_delay_s * k if strategy == "linear" else min_delay_s * 2.0 ** min(k - 1, 64)
    return min(delay, max_delay_s)


def backoff_table(
    max_retry: int, *, strategy: Strategy, min_delay_s: float, max_delay_s: float
) -> list[float]:
    """Delays for retries 1..max_retry, indexed by retry number (index 0 is unused)."""
    return [0.0] + [
        backoff_s(k, strategy=strategy, min_delay_s=min_delay_s, max_delay_s=max_delay_s)
        for k in range(1, max_retry + 1)
    ]
