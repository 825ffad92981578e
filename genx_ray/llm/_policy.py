"""What a client does when calls fail: its retry and fallback policy, and the circuit breakers
that move calls off a model that keeps failing."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("genx_ray.llm")


@dataclass
class Policy:
    max_attempts: int = 6  # per model, the first try included
    initial_interval: float = 0.5
    backoff: float = 2.0
    max_interval: float = 30.0
    fallback: tuple[str, ...] = ()
    breaker_failures: int = 3  # calls that failed for good before a model is skipped...
    breaker_cooldown: float = 30.0  # ...for this long; then one call tries it again
    cache_ttl: float | None = None


@dataclass
class Breaker:
    failures: int = 0
    open_until: float = 0.0


# Circuit breakers are per process, not per client: code that makes a client per call (common)
# must still see a model's run of failures.
_breakers: dict[str, Breaker] = {}


def breaker(model: str) -> Breaker:
    return _breakers.setdefault(model, Breaker())


def chain(policy: Policy, model: str) -> list[str]:
    """The models to try, in order, for a call asking for ``model``: it (or its place in the
    fallback list) and the fallbacks after it, skipping those whose circuit is open (the last
    one is tried anyway)."""
    models = list(policy.fallback)
    models = models[models.index(model) :] if model in models else [model, *models]
    now = time.monotonic()
    usable = [m for m in models if breaker(m).open_until <= now]
    return usable or models[-1:]


def succeeded(model: str) -> None:
    breaker(model).failures = 0


def failed(policy: Policy, model: str) -> None:
    """A call failed for good on ``model``: enough in a row open its circuit for a while."""
    b = breaker(model)
    b.failures += 1
    if b.failures >= policy.breaker_failures:
        b.open_until = time.monotonic() + policy.breaker_cooldown
        b.failures = 0
        log.warning("llm: %s failed %d calls in a row; skipping it for %.0fs", model,
                    policy.breaker_failures, policy.breaker_cooldown)  # fmt: skip
