"""Retry policy of a component: how many attempts, how long between them, which errors retry."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from genx_ray.model import NonRetryable, RetryAfter, UserError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``max_attempts`` counts the first try: 1 means no retry (the default for components).

    The delay before attempt ``n + 1`` is ``initial_interval * backoff ** (n - 1)``, capped at
    ``max_interval``, then spread by +/- ``jitter`` (a fraction) so a burst of failures does not
    come back as a burst. A component that raises :class:`RetryAfter` sets the delay itself.
    ``retry_on`` lists the errors that retry; ``never_retry`` wins over it. :class:`NonRetryable`
    and :class:`UserError` never retry.
    """

    max_attempts: int = 1
    initial_interval: float = 1.0
    backoff: float = 2.0
    max_interval: float = 60.0
    jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    never_retry: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise UserError("RetryPolicy.max_attempts must be at least 1")
        if self.initial_interval < 0 or self.max_interval < 0 or self.backoff < 1:
            raise UserError("RetryPolicy intervals must be >= 0 and backoff >= 1")
        if not 0 <= self.jitter <= 1:
            raise UserError("RetryPolicy.jitter is a fraction between 0 and 1")

    def retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, (NonRetryable, UserError, *self.never_retry)):
            return False
        return isinstance(exc, (RetryAfter, *self.retry_on))

    def delay(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if isinstance(exc, RetryAfter):
            return max(0.0, exc.delay)
        base = min(self.max_interval, self.initial_interval * self.backoff ** (attempt - 1))
        if self.jitter:
            base *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, base)


NO_RETRY = RetryPolicy()
