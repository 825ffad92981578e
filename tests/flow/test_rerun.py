"""Reruns at the engine level: a rerun's journal starts with what the original completed before
the step it reruns from; those steps replay (``reused``) and are not executed again; the
original is left as it was. Map items: rerunning a map runs only its failed items."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from helpers import execute

from genx_ray import component, workflow
from genx_ray.flow import Registry
from genx_ray.model import (
    RunStatus,
    StepError,
    first_failed,
    load_event,
    rerun_entries,
)
from genx_ray.store import RunStore, keys

calls: Counter[str] = Counter()
knobs: dict[str, Any] = {"fail3": True, "bad_items": set()}
reg = Registry()


@component
async def fetch(x: int) -> int:
    calls["fetch"] += 1
    return x + 1


@component
async def parse(x: int) -> int:
    calls["parse"] += 1
    return x * 10


@component
async def enrich(x: int) -> int:
    calls["enrich"] += 1
    if knobs["fail3"]:
        raise RuntimeError("the provider is down")
    return x + 5


@component
async def store_it(x: int) -> str:
    calls["store_it"] += 1
    return f"stored {x}"


@workflow(name="four", registry=reg)
async def four(x: int) -> str:
    a = await fetch(x)
    b = await parse(a)
    c = await enrich(b)
    return await store_it(c)


@component
async def item(i: int) -> int:
    calls[f"item{i}"] += 1
    if i in knobs["bad_items"]:
        raise ValueError(f"item {i} is bad")
    return i * i


@workflow(name="mapped", registry=reg)
async def mapped(n: int) -> int:
    head = await fetch(n)
    squares = await item.map(range(n), concurrency=4)
    failed = [s for s in squares if isinstance(s, StepError)]
    if failed:
        raise RuntimeError(f"{len(failed)} item(s) failed")
    return head + sum(squares)


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    knobs.update(fail3=True, bad_items=set())


async def _events(redis: Any, run_id: str) -> list[Any]:
    raw = await redis.xrange(keys.events(run_id))
    return [load_event(fields[keys.EVENT_FIELD]) for _, fields in raw]


async def _rerun(runs: RunStore, run_id: str, from_step: str | None, **kw: Any) -> str:
    original = await runs.get(run_id)
    steps = await runs.steps(run_id)
    journal = rerun_entries(await runs.journal(run_id), from_step, steps)
    rerun, _ = await runs.rerun(
        original, kw.get("input", original.input), from_step=from_step, journal=journal
    )
    return rerun.id


async def test_a_rerun_from_the_failed_step_reuses_the_steps_before_it(
    redis: Any, runs: RunStore
) -> None:
    run = await runs.create("four", {"x": 1})
    assert await execute(redis, run.id, reg) == "failed"
    before = await runs.get(run.id)
    before_events = await _events(redis, run.id)
    before_journal = await runs.journal(run.id)
    steps = await runs.steps(run.id)
    assert [(s.id, s.status) for s in steps] == [
        ("/0:fetch", "succeeded"), ("/1:parse", "succeeded"), ("/2:enrich", "failed"),
    ]  # fmt: skip
    assert first_failed(steps) == "/2:enrich"
    assert steps[2].error is not None and steps[2].error.message == "the provider is down"

    knobs["fail3"] = False
    rerun_id = await _rerun(runs, run.id, "/2:enrich")
    assert await execute(redis, rerun_id, reg) == "succeeded"
    rerun = await runs.get(rerun_id)
    assert rerun.output == "stored 25" and rerun.rerun_of == run.id
    assert rerun.rerun_from_step == "/2:enrich"
    # Steps 1-2 ran once (in the original), 3 twice, 4 once (in the rerun).
    assert calls == Counter(fetch=1, parse=1, enrich=2, store_it=1)
    completed = [e for e in await _events(redis, rerun_id) if e.type == "step.completed"]
    assert [(e.step.id, e.reused, e.replayed) for e in completed] == [
        ("/0:fetch", True, False), ("/1:parse", True, False),
        ("/2:enrich", False, False), ("/3:store_it", False, False),
    ]  # fmt: skip
    view = {s.id: s for s in await runs.steps(rerun_id)}
    assert view["/0:fetch"].reused and view["/0:fetch"].attempts == 0
    assert not view["/2:enrich"].reused and view["/2:enrich"].attempts == 1

    # The original is as it was, but for the link to its rerun.
    after = await runs.get(run.id)
    assert after.reruns == [rerun_id]
    assert after.model_dump(exclude={"reruns"}) == before.model_dump(exclude={"reruns"})
    assert await _events(redis, run.id) == before_events
    assert await runs.journal(run.id) == before_journal


async def test_a_rerun_from_the_start_runs_every_step_again(redis: Any, runs: RunStore) -> None:
    run = await runs.create("four", {"x": 1})
    assert await execute(redis, run.id, reg) == "failed"
    knobs["fail3"] = False
    rerun_id = await _rerun(runs, run.id, None)
    assert await execute(redis, rerun_id, reg) == "succeeded"
    assert calls == Counter(fetch=2, parse=2, enrich=2, store_it=1)
    assert (await runs.get(rerun_id)).rerun_from_step is None


async def test_a_rerun_with_a_new_input_runs_the_steps_it_reaches_again(
    redis: Any, runs: RunStore
) -> None:
    run = await runs.create("four", {"x": 1})
    assert await execute(redis, run.id, reg) == "failed"
    knobs["fail3"] = False
    rerun_id = await _rerun(runs, run.id, "/2:enrich", input={"x": 2})
    assert await execute(redis, rerun_id, reg) == "succeeded"  # no nondeterminism error
    assert (await runs.get(rerun_id)).output == "stored 35"
    assert calls == Counter(fetch=2, parse=2, enrich=2, store_it=1)


async def test_rerunning_a_map_runs_only_its_failed_items(redis: Any, runs: RunStore) -> None:
    knobs["bad_items"] = {2, 5}
    run = await runs.create("mapped", {"n": 8})
    assert await execute(redis, run.id, reg) == "failed"
    steps = await runs.steps(run.id)
    the_map = next(s for s in steps if s.kind == "map")
    assert the_map.id == "/1:item.map" and first_failed(steps) == the_map.id
    assert (the_map.items, the_map.done, the_map.failed) == (8, 8, 2)
    assert [(f.index, f.error.message) for f in the_map.failed_items or []] == [
        (2, "item 2 is bad"), (5, "item 5 is bad"),
    ]  # fmt: skip
    knobs["bad_items"] = set()
    calls.clear()
    rerun_id = await _rerun(runs, run.id, the_map.id)
    assert await execute(redis, rerun_id, reg) == "succeeded"
    assert (await runs.get(rerun_id)).output == 9 + sum(i * i for i in range(8))
    assert calls == Counter(item2=1, item5=1)  # fetch reused, and the 6 good items too
    assert (await runs.get(rerun_id)).status is RunStatus.SUCCEEDED
