"""Components inside and outside runs: retry, errors, timeouts, cache, streaming, nesting, map."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import pytest
from helpers import sig, step_events, types
from pydantic import BaseModel

from genx_ray import (
    NonRetryable,
    RetryAfter,
    RetryPolicy,
    RunFailed,
    StepError,
    StepTimeout,
    component,
    publish,
    start,
    workflow,
)
from genx_ray.model import UserError

calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset(redis_url: str) -> None:
    calls.clear()


def _flaky(name: str, failures: int, exc: type[Exception] = ValueError):  # type: ignore[no-untyped-def]
    async def fn(x: int) -> int:
        calls[name] += 1
        if calls[name] <= failures:
            raise exc(f"{name} failure {calls[name]}")
        return x * 10

    fn.__name__ = name
    return fn


# -- outside any run: just the function, with retry and timeout ----------------------------------


async def test_called_directly_outside_a_workflow() -> None:
    comp = component(retry=RetryPolicy(max_attempts=3, initial_interval=0))(_flaky("direct", 2))
    assert await comp(4) == 40
    assert calls["direct"] == 3
    slow = component(timeout=0.05)(_sleeper)
    with pytest.raises(TimeoutError):
        await slow(1.0)


async def _sleeper(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


# -- retry ---------------------------------------------------------------------------------------


def test_retry_counts_and_delays() -> None:
    flaky = component(
        retry=RetryPolicy(max_attempts=4, initial_interval=0.05, backoff=2.0, jitter=0)
    )(_flaky("flaky", 2))

    @workflow(name="retry-counts")
    async def wf() -> int:
        return await flaky(1)

    h = start(wf)
    assert h.result(10) == 10
    assert calls["flaky"] == 3
    retrying = step_events(h, "step.retrying")
    assert [(e.step.attempt, e.delay, e.error.type) for e in retrying] == [
        (1, 0.05, "ValueError"),
        (2, 0.1, "ValueError"),
    ]
    done = step_events(h, "step.completed")[0]
    assert done.step.attempt == 3 and done.duration_ms >= 150
    assert types(h) == [
        "run.queued", "run.started", "step.started", "step.retrying", "step.retrying",
        "step.completed", "run.succeeded",
    ]  # fmt: skip


def test_non_retryable_errors_fail_at_once() -> None:
    never = component(retry=RetryPolicy(max_attempts=5, initial_interval=0))(
        _flaky("never", 9, NonRetryable)
    )
    custom = component(
        retry=RetryPolicy(max_attempts=5, initial_interval=0, never_retry=(KeyError,))
    )(_flaky("custom", 9, KeyError))

    @workflow(name="non-retryable")
    async def wf() -> list[str]:
        out = []
        for comp in (never, custom):
            try:
                await comp(1)
            except StepError as exc:
                out.append(f"{exc.component}:{exc.attempt}:{exc.error_type}")
        return out

    assert start(wf).result(10) == ["never:1:NonRetryable", "custom:1:KeyError"]
    assert calls == {"never": 1, "custom": 1}


def test_retry_after_sets_the_delay() -> None:
    @component(retry=RetryPolicy(max_attempts=2, initial_interval=30))
    async def limited() -> str:
        calls["limited"] += 1
        if calls["limited"] == 1:
            raise RetryAfter(0.02, "429 from provider")
        return "ok"

    @workflow(name="retry-after")
    async def wf() -> str:
        return await limited()

    h = start(wf)
    assert h.result(5) == "ok"
    (retrying,) = step_events(h, "step.retrying")
    assert retrying.delay == 0.02 and retrying.error.type == "RetryAfter"


# -- error boundaries ------------------------------------------------------------------------------


def test_a_caught_step_failure_falls_back() -> None:
    primary = component(_flaky("primary", 99))

    @component
    async def fallback(x: int) -> int:
        return -x

    @workflow(name="fallback")
    async def wf(x: int) -> int:
        try:
            return await primary(x)
        except StepError:
            return await fallback(x)

    h = start(wf, {"x": 3})
    assert h.result(5) == -3
    failed = step_events(h, "step.failed")[0]
    assert failed.error.type == "ValueError" and "primary failure 1" in failed.error.message
    assert "Traceback" in (failed.error.traceback or "")
    assert sig(h)[2:] == [
        ("step.started", "/0:primary"),
        ("step.failed", "/0:primary"),
        ("step.started", "/1:fallback"),
        ("step.completed", "/1:fallback"),
        ("run.succeeded", None),
    ]


def test_an_uncaught_step_failure_fails_the_run() -> None:
    broken = component(_flaky("broken", 99))

    @workflow(name="uncaught")
    async def wf() -> int:
        return await broken(1)

    h = start(wf)
    with pytest.raises(RunFailed) as info:
        h.result(5)
    assert info.value.error_type == "StepError" and "broken failure 1" in info.value.error_message
    run = h.get()
    assert run.status == "failed" and run.error is not None and run.finished_at is not None
    assert types(h)[-2:] == ["step.failed", "run.failed"]


# -- timeouts ------------------------------------------------------------------------------------


def test_a_timeout_is_a_failed_attempt() -> None:
    slow = component(timeout=0.05, retry=RetryPolicy(max_attempts=2, initial_interval=0))(_sleeper)

    @workflow(name="timeouts")
    async def wf() -> str:
        try:
            await slow(5.0)
        except StepTimeout as exc:
            return f"{exc.attempt}:{exc.error_type}"
        return "no timeout"

    t0 = time.monotonic()
    h = start(wf)
    assert h.result(5) == "2:TimeoutError"
    assert time.monotonic() - t0 < 2
    assert types(h)[2:-1] == ["step.started", "step.retrying", "step.failed"]


# -- cache ---------------------------------------------------------------------------------------


def test_cache_hit_and_expiry() -> None:
    @component(cache_ttl=2.0, name="cached_square")  # long enough for a loaded machine
    async def square(x: int) -> int:
        calls["square"] += 1
        return x * x

    @workflow(name="cache")
    async def wf(x: int) -> int:
        return await square(x)

    assert start(wf, {"x": 7}).result(5) == 49
    h = start(wf, {"x": 7})
    assert h.result(5) == 49
    assert calls["square"] == 1
    (hit,) = step_events(h, "step.completed")
    assert hit.cached is True
    assert types(h) == ["run.queued", "run.started", "step.completed", "run.succeeded"]

    bumped = square.with_cache(2.0, version="2")  # new version: a miss, original untouched

    @workflow(name="cache-v2")
    async def wf2(x: int) -> int:
        return await bumped(x)

    assert start(wf2, {"x": 7}).result(5) == 49 and calls["square"] == 2
    time.sleep(2.1)
    assert start(wf, {"x": 7}).result(5) == 49
    assert calls["square"] == 3  # expired


def test_the_cache_is_per_tenant_unless_shared_on_purpose() -> None:
    """Tenant B calling what tenant A called runs it (``cached`` tells B nothing of A); a
    component with ``cache_scope="global"`` shares its results on purpose."""

    @component(cache_ttl=60, name="tenant_square")
    async def square(x: int) -> int:
        calls["tenant_square"] += 1
        return x * x

    @workflow(name="tenant-cache")
    async def wf(x: int) -> int:
        return await square(x)

    x = time.monotonic_ns()  # an input no earlier run cached
    first = start(wf, {"x": x}, tenant="acme")
    assert first.result(5) == x * x
    other = start(wf, {"x": x}, tenant="globex")
    assert other.result(5) == x * x and calls["tenant_square"] == 2
    (done,) = step_events(other, "step.completed")
    assert done.cached is False  # globex learns nothing of what acme asked
    again = start(wf, {"x": x}, tenant="acme")
    assert again.result(5) == x * x and calls["tenant_square"] == 2
    assert step_events(again, "step.completed")[0].cached is True  # acme's own result

    shared = square.with_cache(60, scope="global")
    assert (shared.cache_scope, square.cache_scope) == ("global", "tenant")

    @workflow(name="global-cache")
    async def wf_shared(x: int) -> int:
        return await shared(x)

    assert start(wf_shared, {"x": x}, tenant="acme").result(5) == x * x
    assert calls["tenant_square"] == 3
    hit = start(wf_shared, {"x": x}, tenant="globex")
    assert hit.result(5) == x * x and calls["tenant_square"] == 3
    assert step_events(hit, "step.completed")[0].cached is True
    with pytest.raises(UserError, match="cache_scope"):
        component(cache_scope="everyone")(lambda: None)  # type: ignore[call-overload]


# -- streaming, sync, nesting, gather ------------------------------------------------------------


def test_streamed_output_in_order_and_aggregated() -> None:
    @component
    async def tokens(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield f"t{i} "

    @workflow(name="streaming")
    async def wf() -> str:
        return await tokens(50)

    h = start(wf)
    text = h.result(5)
    outputs = step_events(h, "output")
    assert [o.data for o in outputs] == [f"t{i} " for i in range(50)]
    assert text == "".join(o.data for o in outputs)
    assert {o.step.id for o in outputs} == {"/0:tokens"}


def test_sync_components_run_in_threads_and_can_publish() -> None:
    main_thread = threading.get_ident()

    @component
    def blocking(seconds: float) -> int:
        publish("blocking", {"thread_is_main": threading.get_ident() == main_thread})
        time.sleep(seconds)
        return threading.get_ident()

    @component
    async def ticker(until: float) -> int:
        ticks = 0
        while time.monotonic() < until:
            await asyncio.sleep(0.01)
            ticks += 1
        return ticks

    @workflow(name="sync-steps")
    async def wf() -> int:
        _, ticks = await asyncio.gather(blocking(0.3), ticker(time.monotonic() + 0.3))
        return ticks

    h = start(wf)
    assert h.result(5) >= 15  # the loop kept turning while the sync step slept
    (progress,) = step_events(h, "progress")
    assert progress.step.id == "/0:blocking" and progress.data == {"thread_is_main": False}


def test_nested_and_gathered_steps_have_deterministic_ids() -> None:
    @component
    async def leaf(x: int) -> int:
        await asyncio.sleep(0.01 * (3 - x))  # finish in reverse order
        return x

    @component
    async def branch(x: int) -> int:
        a, b = await asyncio.gather(leaf(x), leaf(x + 1))
        return a + b

    @workflow(name="nesting")
    async def wf() -> list[int]:
        return list(await asyncio.gather(branch(0), branch(1)))

    h = start(wf)
    assert h.result(5) == [1, 3]
    started = [e.step.id for e in step_events(h, "step.started")]
    assert sorted(started) == sorted([
        "/0:branch", "/1:branch", "/0:branch/0:leaf", "/0:branch/1:leaf",
        "/1:branch/0:leaf", "/1:branch/1:leaf",
    ])  # fmt: skip


# -- map -----------------------------------------------------------------------------------------


class _InFlight:
    """How many calls are in flight at once, at most."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    async def hold(self, seconds: float) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        await asyncio.sleep(seconds)
        self.now -= 1


def test_map_order_errors_and_concurrency() -> None:
    active = _InFlight()

    @component
    async def item(x: int) -> int:
        await active.hold(0.002)
        if x % 7 == 3:
            raise ValueError(f"bad item {x}")
        return x * 2

    @workflow(name="map")
    async def wf(n: int) -> list[str]:
        results = await item.map(range(n), concurrency=5)
        return [r.error_type if isinstance(r, StepError) else str(r) for r in results]

    h = start(wf, {"n": 40})
    out = h.result(10)
    assert out == ["ValueError" if x % 7 == 3 else str(x * 2) for x in range(40)]
    assert active.peak == 5
    failed = step_events(h, "step.failed")
    assert [e.step.id for e in failed] == [f"/0:item.map/{x}:item" for x in range(40) if x % 7 == 3]
    final = step_events(h, "progress")[-1]
    assert final.data["done"] == 40 and final.data["failed"] == 6 and final.data["total"] == 40


async def test_map_keeps_as_many_in_flight_as_the_largest_llm_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    active = _InFlight()

    @component
    async def call(x: int) -> int:
        await active.hold(0.02)
        return x

    monkeypatch.delenv("GENX_LLM_LIMITS", raising=False)
    assert await call.map(range(60)) == list(range(60))
    assert active.peak == 16
    limits = {"gpt-4o*": {"concurrency": 40}, "*": {"concurrency": 8}, "o1": {"rpm": 100}}
    monkeypatch.setenv("GENX_LLM_LIMITS", json.dumps(limits))
    active.peak = 0
    assert await call.map(range(60)) == list(range(60))
    assert active.peak == 40
    active.peak = 0
    await call.map(range(60), concurrency=3)  # said explicitly: that, whatever the budgets
    assert active.peak == 3


def test_map_fail_fast_raises() -> None:
    @component
    async def picky(x: int) -> int:
        if x == 2:
            raise ValueError("no twos")
        return x

    @workflow(name="map-fail-fast")
    async def wf() -> list[int]:
        return await picky.map(range(5), concurrency=1, fail_fast=True)  # type: ignore[return-value]

    with pytest.raises(RunFailed) as info:
        start(wf).result(5)
    assert "no twos" in info.value.error_message


def test_progress_events_stay_few_for_big_maps() -> None:
    @component
    async def noop(x: int) -> int:
        return x

    @workflow(name="map-big")
    async def wf() -> int:
        return len(await noop.map(range(3000), concurrency=64))

    h = start(wf)
    assert h.result(60) == 3000
    progress = step_events(h, "progress")
    assert 1 <= len(progress) <= 20
    assert len(types(h)) < 30  # no per-item started/completed events


async def test_map_outside_a_run_returns_errors_in_place() -> None:
    """As in a run: a StepError in the failed item's place, its own exception as the cause."""
    calls: list[int] = []

    @component(retry=RetryPolicy(max_attempts=2, initial_interval=0, retry_on=(TimeoutError,)))
    async def half(x: int) -> float:
        calls.append(x)
        if x == 0:
            raise TimeoutError("slow provider")
        if x == 3:
            raise ZeroDivisionError("zero")  # not retried
        return 1 / x

    results = await half.map([0, 1, 2, 3])
    assert results[1:3] == [1.0, 0.5]
    timed_out, zero = results[0], results[3]
    assert isinstance(timed_out, StepTimeout) and isinstance(zero, StepError)
    assert (timed_out.step_id, timed_out.attempt, timed_out.error_type) == (
        "half.map/0:half", 2, "TimeoutError",
    )  # fmt: skip
    assert (zero.step_id, zero.attempt, zero.error_message) == ("half.map/3:half", 1, "zero")
    assert isinstance(zero.__cause__, ZeroDivisionError)
    assert sorted(calls) == [0, 0, 1, 2, 3]
    with pytest.raises(StepError) as raised:
        await half.map([1, 3], fail_fast=True)
    assert raised.value.step_id == "half.map/1:half"


# -- configuration ---------------------------------------------------------------------------------


def test_with_methods_return_new_components() -> None:
    @component(cache_ttl=10, timeout=5)
    async def base(x: int) -> int:
        return x

    fast = base.with_retry(max_attempts=2).with_cache(ttl=60).with_timeout(1).with_name("fast")
    placed = base.with_resources(num_cpus=0, resources={"llm": 1}, node_labels={"zone": "a"})
    assert (base.retry.max_attempts, base.cache_ttl, base.timeout, base.name) == (1, 10, 5, "base")
    assert (fast.retry.max_attempts, fast.cache_ttl, fast.timeout, fast.name) == (2, 60, 1, "fast")
    assert not base.remote and placed.remote and placed.resources == {"llm": 1}
    with pytest.raises(UserError):
        base.with_name("bad/name")
    with pytest.raises(UserError):
        RetryPolicy(max_attempts=0)


def test_workflow_schemas_from_signatures() -> None:
    class Inp(BaseModel):
        url: str
        depth: int = 2

    class Report(BaseModel):
        pages: int

    @workflow(name="schemas")
    async def model_in(inp: Inp) -> Report:
        """Crawl a site.

        More details."""
        return Report(pages=inp.depth)

    @workflow(name="schemas-params")
    async def params_in(url: str, depth: int = 1) -> int:
        return depth

    assert model_in.description == "Crawl a site."
    assert model_in.input_schema()["required"] == ["url"]
    assert model_in.output_schema()["properties"] == {
        "pages": {"title": "Pages", "type": "integer"}
    }
    assert params_in.input_schema()["required"] == ["url"]
    assert params_in.output_schema() == {"type": "integer"}
    assert start(model_in, {"url": "http://x", "depth": 4}).result(5) == Report(pages=4)
