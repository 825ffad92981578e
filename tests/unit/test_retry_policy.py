"""RetryPolicy: how many attempts, how long between them, which errors retry."""

from __future__ import annotations

import pytest

from genx_ray import NonRetryable, RetryAfter, RetryPolicy, UserError


def test_delays_grow_by_the_backoff_up_to_the_cap() -> None:
    policy = RetryPolicy(max_attempts=6, initial_interval=0.5, backoff=2, max_interval=3, jitter=0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_jitter_spreads_each_delay_within_its_fraction() -> None:
    policy = RetryPolicy(initial_interval=1.0, backoff=1, jitter=0.1)
    delays = [policy.delay(1) for _ in range(500)]
    assert all(0.9 <= d <= 1.1 for d in delays) and max(delays) - min(delays) > 0.05


def test_retry_after_sets_the_delay_itself() -> None:
    policy = RetryPolicy(initial_interval=30)
    assert policy.delay(1, RetryAfter(0.25)) == 0.25
    assert policy.delay(1, RetryAfter(-1)) == 0.0


def test_which_errors_retry() -> None:
    policy = RetryPolicy(max_attempts=3, never_retry=(KeyError,))
    assert policy.retryable(ValueError("x")) and policy.retryable(RetryAfter(1))
    assert not policy.retryable(KeyError("x"))  # never_retry wins over retry_on
    assert not policy.retryable(NonRetryable("x")) and not policy.retryable(UserError("x"))
    only = RetryPolicy(retry_on=(TimeoutError,))
    assert only.retryable(TimeoutError()) and not only.retryable(ValueError())


@pytest.mark.parametrize(
    "fields",
    [{"max_attempts": 0}, {"initial_interval": -1}, {"backoff": 0.5}, {"jitter": 2}],
)
def test_nonsense_policies_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(UserError):
        RetryPolicy(**fields)  # type: ignore[arg-type]
