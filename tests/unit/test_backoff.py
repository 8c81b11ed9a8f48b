"""Backoff: SPEC §4 formulas, the cap, and the table the store's lease is built from."""

from __future__ import annotations

import pytest

from ntorque.backoff import backoff_s, backoff_table


@pytest.mark.parametrize(
    ("k", "expected"), [(1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (10, 1024.0), (12, 4096.0)]
)
def test_exponential_is_min_times_two_to_k_minus_one(k: int, expected: float) -> None:
    assert backoff_s(k, strategy="exponential", min_delay_s=2, max_delay_s=7200) == expected


@pytest.mark.parametrize(("k", "expected"), [(1, 2.0), (2, 4.0), (3, 6.0), (10, 20.0)])
def test_linear_is_min_times_k(k: int, expected: float) -> None:
    assert backoff_s(k, strategy="linear", min_delay_s=2, max_delay_s=7200) == expected


@pytest.mark.parametrize("strategy", ["exponential", "linear"])
def test_never_above_the_cap(strategy: str) -> None:
    delays = [
        backoff_s(k, strategy=strategy, min_delay_s=2, max_delay_s=100)  # type: ignore[arg-type]
        for k in range(1, 200)
    ]
    assert max(delays) == 100
    assert delays == sorted(delays), "delays never shrink as retries grow"


def test_huge_retry_numbers_do_not_overflow() -> None:
    assert backoff_s(10**6, strategy="exponential", min_delay_s=2, max_delay_s=7200) == 7200


def test_retry_zero_counts_as_the_first() -> None:
    assert backoff_s(0, strategy="exponential", min_delay_s=3, max_delay_s=10) == 3


def test_fractional_delays() -> None:
    assert backoff_s(3, strategy="exponential", min_delay_s=0.05, max_delay_s=1) == pytest.approx(
        0.2
    )
    assert backoff_s(3, strategy="linear", min_delay_s=0.05, max_delay_s=1) == pytest.approx(0.15)


def test_table_is_indexed_by_retry_number() -> None:
    table = backoff_table(4, strategy="exponential", min_delay_s=1, max_delay_s=5)
    assert table == [0.0, 1.0, 2.0, 4.0, 5.0]
