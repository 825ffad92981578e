"""The instrumentation seam: the engine reports each thing that happens once, to one observer
(genx_ray.observe.Observer), whatever observes it. A recording observer stands in for tracing
and metrics here; the real ones are checked end to end in tests/stack (tracing, metrics)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from helpers import execute

from genx_ray import RetryPolicy, StepError, component, workflow
from genx_ray.flow import Registry
from genx_ray.model import Run, RunRestartedEvent, RunStatus
from genx_ray.observe import Metrics, Observation, Observer, Observers, observer, use
from genx_ray.store import RunStore

reg = Registry()
gate = asyncio.Event()
flaky_calls = {"n": 0}


@component
async def plain(x: int) -> int:
    return x + 1


@component(retry=RetryPolicy(max_attempts=3, initial_interval=0.01))
async def flaky(x: int) -> int:
    flaky_calls["n"] += 1
    if flaky_calls["n"] == 1:
        raise ConnectionError("once")
    return x * 2


@component
async def item(x: int) -> int:
    if x == 2:
        raise ValueError("two")
    return x


@component
async def held(x: int) -> int:
    await gate.wait()
    return x


@workflow(name="observed_seam", registry=reg)
async def observed_seam(x: int) -> int:
    a = await plain(x)
    b = await flaky(a)
    results = await item.map([1, 2, 3], concurrency=2, spread=False)
    ok = [r for r in results if not isinstance(r, StepError)]
    return await held(b + sum(ok))


class Recording(Observer):
    """Every hook, as (hook, subject, details), in the order the engine called them."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, Any]] = []

    def _observed(self, hook: str, subject: str) -> Observation:
        log = self.log

        class Recorded(Observation):
            def retried(self, attempt: int, error: BaseException, delay: float) -> None:
                log.append((f"{hook}.retried", subject, (attempt, type(error).__name__)))

            def ended(self, **outcome: Any) -> None:
                kept = {k: v for k, v in outcome.items() if k != "seconds"}
                log.append((f"{hook}.ended", subject, kept))

            def failed(self, error: BaseException | str, error_type: str | None = None) -> None:
                log.append((f"{hook}.failed", subject, str(error)))

        return Recorded()

    def run_created(self, workflow: str) -> None:
        self.log.append(("run_created", workflow, None))

    def attempt(self, run: Run, replayable: int) -> Observation:
        self.log.append(("attempt", run.workflow, (run.attempt, replayable)))
        return self._observed("attempt", run.workflow)

    def step(self, component: str, step_id: str) -> Observation:
        self.log.append(("step", step_id, None))
        return self._observed("step", step_id)

    def step_replayed(self, component: str, step_id: str) -> None:
        self.log.append(("step_replayed", step_id, None))

    def item_ended(
        self, component: str, step_id: str, seconds: float, error_type: str | None = None
    ) -> None:
        self.log.append(("item_ended", step_id, error_type))

    def map(self, component: str, map_id: str, items: int, concurrency: int) -> Observation:
        self.log.append(("map", map_id, (items, concurrency)))
        return self._observed("map", map_id)


@pytest.fixture
def recording() -> Iterator[Recording]:
    rec = Recording()
    previous = use(Observers(rec, Metrics()))  # what observes besides metrics, here: a recorder
    try:
        yield rec
    finally:
        use(previous)


async def test_each_thing_that_happens_is_reported_once_in_order(
    redis: Any, runs: RunStore, recording: Recording
) -> None:
    flaky_calls["n"] = 0
    gate.clear()
    run = await runs.create("observed_seam", {"x": 1})
    host = asyncio.create_task(execute(redis, run.id, reg))
    for _ in range(500):  # until the last step runs (5 s at most)
        if any(e[0] == "step" and e[1] == "/3:held" for e in recording.log) or host.done():
            break
        await asyncio.sleep(0.01)
    host.cancel()  # the host dies in the last step: its attempt is never told how it ended
    with pytest.raises(asyncio.CancelledError):
        await host
    first = list(recording.log)
    items = sorted(e for e in first if e[0] == "item_ended")
    assert [e for e in first if e[0] != "item_ended"] == [
        ("run_created", "observed_seam", None),
        ("attempt", "observed_seam", (1, 0)),
        ("step", "/0:plain", None),
        ("step.ended", "/0:plain", {"attempts": 1}),
        ("step", "/1:flaky", None),
        ("step.retried", "/1:flaky", (1, "ConnectionError")),
        ("step.ended", "/1:flaky", {"attempts": 2}),
        ("map", "/2:item.map", (3, 2)),
        ("map.ended", "/2:item.map", {"failed": 1, "replayed": 0, "where": "loop"}),
        ("step", "/3:held", None),
    ]
    assert items == [  # a map's items: one report each, the failed one with its error
        ("item_ended", "/2:item.map/0:item", None),
        ("item_ended", "/2:item.map/1:item", "ValueError"),
        ("item_ended", "/2:item.map/2:item", None),
    ]

    # Attempt 2 replays what attempt 1 finished: reported as replayed, not run again.
    recording.log.clear()
    await runs.transition(
        run.id, RunStatus.QUEUED, allowed={RunStatus.RUNNING}, fields={"attempt": "2"},
        event=RunRestartedEvent(run_id=run.id, attempt=2, reason="host lost"),
    )  # fmt: skip
    gate.set()
    assert await execute(redis, run.id, reg) == RunStatus.SUCCEEDED
    assert recording.log == [
        ("attempt", "observed_seam", (2, 5)),  # 2 steps and 3 map items in the journal
        ("step_replayed", "/0:plain", None),
        ("step_replayed", "/1:flaky", None),
        ("map", "/2:item.map", (3, 2)),
        ("map.ended", "/2:item.map", {"failed": 1, "replayed": 3, "where": "loop"}),
        ("step", "/3:held", None),
        ("step.ended", "/3:held", {"attempts": 1}),
        ("attempt.ended", "observed_seam", {"status": "succeeded"}),
    ]


def test_with_tracing_off_the_process_observes_with_metrics_alone() -> None:
    """No OTEL_* variable names an exporter in the tests: no tracing observer, so no span object
    is ever built (the seam's promise for a disabled tracer)."""
    assert isinstance(observer(), Metrics)


class Counting(Observer):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def remote(
        self, context: str | None, kind: str, component: str, attributes: Mapping[str, Any]
    ) -> Observation:
        self.seen.append(kind)
        return super().remote(context, kind, component, attributes)


def test_composed_observers_each_see_every_hook_and_carry_back_what_metrics_recorded() -> None:
    a, b = Counting(), Counting()
    both = Observers(a, Metrics(), b)
    with both.remote(None, "chunk", "c", {}) as work:
        both.item_ended("c", "/0:c.map/0:c", 0.25)
    assert a.seen == b.seen == ["chunk"]
    carried = work.carried  # what the map actor sends back with its results
    assert carried is not None
    assert carried.observations == [("genx_step_duration_seconds", ("c",), 0.25)]
