"""The LLM layer's pure rules: which budget a model draws on, how a Retry-After is read, which
models a call tries in turn (fallback and circuit breakers), what a call costs."""

from __future__ import annotations

import time

import httpx2 as httpx
import pytest

from genx_ray.llm import _policy as policy
from genx_ray.llm._limits import match
from genx_ray.llm._transport import _retry_after
from genx_ray.llm._usage import cost_nanos
from genx_ray.model import LLMLimit

LIMITS = {"gpt-4o": LLMLimit(1), "gpt-4o*": LLMLimit(2), "gpt-*": LLMLimit(3), "*": LLMLimit(4)}


@pytest.mark.parametrize(
    ("model", "budget"),
    [("gpt-4o", "gpt-4o"), ("gpt-4o-mini", "gpt-4o*"), ("gpt-3.5", "gpt-*"), ("claude", "*")],
)
def test_an_exact_name_then_the_longest_glob(model: str, budget: str) -> None:
    assert match(LIMITS, model) == budget


def test_no_budget_without_a_matching_glob() -> None:
    assert match({"gpt-*": LLMLimit(1)}, "claude") is None


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer one first
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-5"}, 0.0),
        ({"retry-after": "100000"}, 120.0),  # capped
        ({}, None),
    ],
)
def test_retry_after_headers(headers: dict[str, str], seconds: float | None) -> None:
    assert _retry_after(httpx.Response(429, headers=headers)) == seconds


def test_fallback_chain_skips_open_circuits_and_closes_them_on_success() -> None:
    rules = policy.Policy(fallback=("m-a", "m-b", "m-c"), breaker_failures=2, breaker_cooldown=60)
    assert policy.chain(rules, "m-b") == ["m-b", "m-c"]
    assert policy.chain(rules, "other") == ["other", "m-a", "m-b", "m-c"]
    policy.failed(rules, "m-a")
    assert policy.chain(rules, "m-a")[0] == "m-a"  # one failure: still tried
    policy.failed(rules, "m-a")
    assert policy.chain(rules, "m-a") == ["m-b", "m-c"]  # open: skipped for the cooldown
    policy.breaker("m-a").open_until = time.monotonic() - 1
    assert policy.chain(rules, "m-a")[0] == "m-a"  # cooled down: tried again
    policy.succeeded("m-a")
    assert policy.breaker("m-a").failures == 0


def test_cost_is_counted_in_whole_nano_dollars() -> None:
    assert cost_nanos("gpt-4o", 1_000_000, 0) == 2_500_000_000  # $2.50 per 1M input tokens
    assert cost_nanos("gpt-4o-mini", 3, 5) == (3 * 150 + 5 * 600)
    assert cost_nanos("unknown", 10, 10) == 0
