"""Durable waits in one process (the local runner): input, sleep, child runs, delayed runs and
schedules. What they must do across real worker processes is in tests/chaos/test_waits.py."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import types
from pydantic import BaseModel, Field

from genx_ray import (
    ChildFailed,
    InputTimeout,
    component,
    publish,
    sleep,
    start,
    wait_for_input,
    workflow,
)
from genx_ray.model import InputInvalid, NotWaitingForInput, RunCancelled, RunStatus
from genx_ray.service import RunHandle, Timers
from genx_ray.store import RunStore, ScheduleNotFound, ScheduleStore, keys, sync_redis

pytestmark = pytest.mark.timeout(60)
calls: Counter[str] = Counter()


class Approval(BaseModel):
    ok: bool
    note: str = Field(default="", max_length=20)


@component
async def prepare(x: int) -> int:
    calls["prepare"] += 1
    return x + 1


@component
async def finish(x: int) -> int:
    calls["finish"] += 1
    return x * 10


@workflow(name="approve")
async def approve(x: int, deadline: float | None = None) -> dict[str, Any]:
    a = await prepare(x)
    publish("phase", {"a": a})
    try:
        answer = await wait_for_input(Approval, timeout=deadline, prompt="ship it?")
    except InputTimeout:
        return {"a": a, "answer": "timed out"}
    return {"a": a, "answer": answer.model_dump(), "model": type(answer).__name__,
            "b": await finish(a)}  # fmt: skip


@workflow(name="nap")
async def nap(seconds: float) -> int:
    await prepare(0)
    await sleep(seconds)
    return await finish(0)


@workflow(name="child-double")
async def child_double(n: int, fail: bool = False, nap: float = 0) -> int:
    if nap:
        await sleep(nap)
    if fail:
        raise ValueError(f"cannot double {n}")
    return n * 2


@workflow(name="parent")
async def parent(n: int, fail: bool = False, nap: float = 0) -> dict[str, Any]:
    background = await child_double.start_child(n=n, nap=nap)
    try:
        direct = await child_double.run_child(n=n + 1, fail=fail)
    except ChildFailed as exc:
        return {"failed": exc.status, "child": exc.child_id}
    return {"direct": direct, "background": await background.result(), "id": background.id}


def _wait_status(handle: RunHandle, status: RunStatus, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while handle.status is not status:
        assert time.monotonic() < deadline, f"{handle.id} is {handle.status}, never {status}"
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def _reset(redis_url: str) -> None:
    calls.clear()


def test_a_run_waits_for_input_then_carries_on_with_the_validated_model() -> None:
    h = start(approve, {"x": 1})
    _wait_status(h, RunStatus.WAITING)
    run = h.get()
    assert run.waiting is not None and run.waiting.kind == "input"
    assert run.waiting.prompt == "ship it?" and run.waiting.deadline is None
    requested = [e.event for e in h.events(follow=False) if e.event.type == "input.requested"]
    assert len(requested) == 1 and requested[0].input_id == run.waiting.input_id
    assert requested[0].input_schema["required"] == ["ok"]

    after = h.send_input({"ok": True, "note": "fine"}, input_id=run.waiting.input_id)
    assert after.status in (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.SUCCEEDED)
    out = h.result(15)
    assert out == {"a": 2, "answer": {"ok": True, "note": "fine"}, "model": "Approval", "b": 20}
    assert calls == {"prepare": 1, "finish": 1}  # the step before the wait ran once
    assert types(h) == [
        "run.queued", "run.started", "step.started", "step.completed", "progress",
        "run.waiting", "input.requested", "input.received", "run.resumed",
        "run.started", "step.completed", "step.started", "step.completed", "run.succeeded",
    ]  # fmt: skip
    replayed = [e.event for e in h.events(follow=False) if e.event.type == "step.completed"]
    assert [e.replayed for e in replayed] == [False, True, False]


def test_input_that_does_not_fit_is_refused_naming_the_field_and_changes_nothing() -> None:
    h = start(approve, {"x": 1})
    _wait_status(h, RunStatus.WAITING)
    with pytest.raises(InputInvalid, match=r"input: ok: 'yes' is not of type 'boolean'"):
        h.send_input({"ok": "yes"})
    with pytest.raises(InputInvalid, match=r"note"):
        h.send_input({"ok": True, "note": "x" * 21})
    with pytest.raises(NotWaitingForInput, match="waits for input inp_"):
        h.send_input({"ok": True}, input_id="inp_someone_elses")
    assert h.status is RunStatus.WAITING
    assert "input.received" not in types(h)
    h.send_input(Approval(ok=False))
    assert h.result(15)["answer"] == {"ok": False, "note": ""}
    with pytest.raises(NotWaitingForInput, match="is succeeded, not waiting for input"):
        h.send_input({"ok": True})


def test_past_its_deadline_the_wait_raises_input_timeout_in_the_workflow() -> None:
    h = start(approve, {"x": 5, "deadline": 1.0})
    _wait_status(h, RunStatus.WAITING)
    deadline = h.get().waiting.deadline  # type: ignore[union-attr]
    assert deadline is not None
    assert h.result(15) == {"a": 6, "answer": "timed out"}
    resumed = [e for e in h.events(follow=False) if e.event.type == "run.resumed"]
    assert resumed[0].event.reason == "input timed out"  # type: ignore[union-attr]
    assert resumed[0].event.ts - deadline.timestamp() < 1.0  # type: ignore[union-attr]
    with pytest.raises(NotWaitingForInput):
        h.send_input({"ok": True})


def test_a_durable_sleep_parks_the_run_and_wakes_it_within_a_second_of_its_time() -> None:
    h = start(nap, {"seconds": 2.0})
    _wait_status(h, RunStatus.WAITING)
    run = h.get()
    assert run.waiting is not None and run.waiting.kind == "sleep"
    assert h.result(15) == 0
    until = run.waiting.until.timestamp()  # type: ignore[union-attr]
    woke = next(e.event.ts for e in h.events(follow=False) if e.event.type == "run.resumed")
    assert until <= woke < until + 1.0
    assert calls == {"prepare": 1, "finish": 1}
    assert "run.waiting" in types(h) and types(h).count("run.started") == 2


def test_cancel_reaches_a_waiting_run_at_once() -> None:
    h = start(approve, {"x": 1})
    _wait_status(h, RunStatus.WAITING)
    assert h.cancel() is RunStatus.CANCELLED
    with pytest.raises(RunCancelled):
        h.result(5)
    with pytest.raises(NotWaitingForInput):
        h.send_input({"ok": True})
    assert types(h)[-1] == "run.cancelled"


def test_a_child_run_is_its_own_run_and_its_outcome_comes_back_to_the_parent() -> None:
    h = start(parent, {"n": 3})
    out = h.result(30)
    assert out["direct"] == 8 and out["background"] == 6
    child = RunHandle(out["id"], _url())
    assert child.get().parent_id == h.id and child.status is RunStatus.SUCCEEDED
    kinds = [(e.event.type, getattr(e.event, "status", None)) for e in h.events(follow=False)
             if e.event.type.startswith("child.")]  # fmt: skip
    assert kinds == [("child.started", None), ("child.started", None),
                     ("child.finished", "succeeded"), ("child.finished", "succeeded")]  # fmt: skip


def test_a_failed_child_raises_child_failed_in_the_parent() -> None:
    h = start(parent, {"n": 3, "fail": True})
    out = h.result(30)
    assert out["failed"] == "failed" and out["child"].startswith("run_")


def test_cancelling_a_parent_cancels_its_children() -> None:
    h = start(parent, {"n": 3, "nap": 30})
    _wait_status(h, RunStatus.WAITING)  # on the direct child, which ends; then on the sleeper
    deadline = time.monotonic() + 15
    while len([t for t in types(h) if t == "child.finished"]) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sleeper = next(e.event.child_id for e in h.events(follow=False)  # type: ignore[union-attr]
                   if e.event.type == "child.started")  # fmt: skip
    assert h.cancel() is RunStatus.CANCELLED
    assert RunHandle(sleeper, _url()).status is RunStatus.CANCELLED


def test_a_delayed_run_is_scheduled_until_its_time() -> None:
    h = start(nap, {"seconds": 0}, delay_seconds=1.5)
    assert h.status is RunStatus.SCHEDULED
    assert types(h) == ["run.scheduled"]
    h.result(15)
    run = h.get()
    assert run.started_at is not None
    assert 1.5 <= (run.started_at - run.created_at).total_seconds() < 2.5
    assert types(h)[:3] == ["run.scheduled", "run.queued", "run.started"]


def test_a_start_time_must_be_aware_and_one_of_the_two() -> None:
    with pytest.raises(InputInvalid, match="start_at: must carry a time zone"):
        start(nap, {"seconds": 0}, start_at=datetime.now() + timedelta(seconds=5))
    with pytest.raises(InputInvalid, match="not both"):
        start(nap, {"seconds": 0}, start_at=datetime.now(UTC), delay_seconds=3)
    with pytest.raises(InputInvalid, match="delay_seconds: must be from 0"):
        start(nap, {"seconds": 0}, delay_seconds=-1)


async def test_a_bad_cron_or_time_zone_is_refused_naming_the_field(redis: Any) -> None:
    store = ScheduleStore(redis)
    with pytest.raises(InputInvalid, match=r"^cron: 'every day' is not a cron expression"):
        await store.create("nap", "every day", None, timezone="UTC", tenant="default")
    with pytest.raises(InputInvalid, match=r"^timezone: 'Mars/Olympus' is not a time zone"):
        await store.create("nap", "0 9 * * *", None, timezone="Mars/Olympus", tenant="default")
    assert await store.list(tenant="default") == []


async def test_each_tick_starts_one_run_however_many_timer_services_look(
    redis: Any, runs: RunStore
) -> None:
    store = ScheduleStore(redis)
    schedule = await store.create(
        "nap",
        "* * * * * */1",
        {"seconds": 0},
        timezone="Europe/Paris",
        tenant="sched",
        overlap="allow",  # the runs stay queued (no worker here): each tick starts one anyway
    )  # every second (a sixth field: seconds)
    services = [Timers(runs) for _ in range(4)]
    began = time.time()
    while time.time() - began < 3.6:
        await asyncio.gather(*(t.tick() for t in services))
        await asyncio.sleep(0.05)
    await store.delete(schedule.id, tenant="sched")
    started, _ = await runs.list(tenant="sched", limit=100)
    await _cancel_all(runs, started)  # queued for workers: none runs here
    assert 3 <= len(started) <= 4  # one per second passed, never two for one tick
    assert {r.workflow for r in started} == {"nap"}
    with pytest.raises(ScheduleNotFound):
        await store.get(schedule.id, tenant="sched")


async def test_a_schedule_missed_while_no_worker_ran_starts_once(
    redis: Any, runs: RunStore
) -> None:
    store = ScheduleStore(redis)
    schedule = await store.create("nap", "* * * * *", {"seconds": 0}, timezone="UTC",
                                  tenant="missed")  # fmt: skip
    # Every worker was down for the last three ticks (any timer service may see it first).
    await redis.zadd(keys.SCHEDULES_DUE, {schedule.id: time.time() - 170})
    await Timers(runs).tick()
    await Timers(runs).tick()
    after = await store.get(schedule.id, tenant="missed")
    await store.delete(schedule.id, tenant="missed")
    started, _ = await runs.list(tenant="missed", limit=100)
    await _cancel_all(runs, started)
    assert len(started) == 1
    assert after.next_run_at is not None and after.next_run_at.timestamp() > time.time()


async def _cancel_all(runs: RunStore, started: list[Any]) -> None:
    for run in started:
        await runs.request_cancel(run.id)


def _url() -> str:
    import os

    return os.environ["GENX_REDIS_URL"]


def test_a_parents_children_set_expires_with_it() -> None:
    """The set of a run's children is one of its keys: it expires with the run, not never."""
    h = start(parent, {"n": 3})
    assert h.result(15)["direct"] == 8
    client = sync_redis(_url())
    try:
        ttl = client.ttl(keys.children(h.id))
        assert 0 < ttl <= client.ttl(keys.run(h.id)) + 1, ttl
    finally:
        client.close()
