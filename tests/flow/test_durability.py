"""The journal: a restarted run replays completed steps; nondeterminism is named; cancel stops."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from helpers import execute, sig

from genx_ray import component, start, workflow
from genx_ray.flow import Registry
from genx_ray.model import RunRestartedEvent, RunStatus
from genx_ray.store import EventStore, RunStore

calls: Counter[str] = Counter()
gate = asyncio.Event()
knobs: dict[str, Any] = {"offset": 0, "swap": False}
reg = Registry()


@component
async def s1(x: int) -> int:
    calls["s1"] += 1
    return x + 1


@component
async def s2(x: int) -> int:
    calls["s2"] += 1
    return x * 2


@component
async def s2b(x: int) -> int:
    return x


@component
async def s3(x: int) -> int:
    calls["s3"] += 1
    await gate.wait()
    return x - 1


@workflow(name="durable", registry=reg)
async def durable(x: int) -> int:
    a = await s1(x)
    b = await (s2b if knobs["swap"] else s2)(a + knobs["offset"])
    return await s3(b)


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    gate.clear()
    knobs.update(offset=0, swap=False)


async def _crash_mid_run(redis: Any, runs: RunStore) -> str:
    """Start a run, kill its host while the third step runs, and requeue it as attempt 2
    (what the supervisor does when a heartbeat goes stale)."""
    run = await runs.create("durable", {"x": 1})
    host = asyncio.create_task(execute(redis, run.id, reg))
    while calls["s3"] == 0:  # noqa: ASYNC110 - polling a counter the step bumps
        await asyncio.sleep(0.005)
    host.cancel()  # the host dies: nothing after this point is written by it
    with pytest.raises(asyncio.CancelledError):
        await host
    await runs.transition(
        run.id, RunStatus.QUEUED, allowed={RunStatus.RUNNING}, fields={"attempt": "2"},
        event=RunRestartedEvent(run_id=run.id, attempt=2, reason="heartbeat lost"),
    )  # fmt: skip
    return run.id


async def test_a_restarted_run_reuses_its_journal(
    redis: Any, runs: RunStore, events: EventStore
) -> None:
    run_id = await _crash_mid_run(redis, runs)
    gate.set()
    assert await execute(redis, run_id, reg) == RunStatus.SUCCEEDED
    assert calls == {"s1": 1, "s2": 1, "s3": 2}  # only the unfinished step ran again
    run = await runs.get(run_id)
    assert run.output == 3 and run.attempt == 2
    seq = [
        (e.event.type, getattr(getattr(e.event, "step", None), "id", None),
         getattr(e.event, "replayed", None))
        for e in await events.read(run_id)
    ]  # fmt: skip
    assert seq == [
        ("run.queued", None, None),
        ("run.started", None, None),
        ("step.started", "/0:s1", None),
        ("step.completed", "/0:s1", False),
        ("step.started", "/1:s2", None),
        ("step.completed", "/1:s2", False),
        ("step.started", "/2:s3", None),
        ("run.restarted", None, None),
        ("run.started", None, None),
        ("step.completed", "/0:s1", True),
        ("step.completed", "/1:s2", True),
        ("step.started", "/2:s3", None),
        ("step.completed", "/2:s3", False),
        ("run.succeeded", None, None),
    ]


@pytest.mark.parametrize(
    ("knob", "expected"),
    [
        (("offset", 5), "another input than the journal recorded"),
        (("swap", True), "recorded /1:s2 at this position"),
    ],
)
async def test_a_different_path_on_restart_is_named(
    redis: Any, runs: RunStore, knob: tuple[str, Any], expected: str
) -> None:
    run_id = await _crash_mid_run(redis, runs)
    knobs[knob[0]] = knob[1]
    gate.set()
    assert await execute(redis, run_id, reg) == RunStatus.FAILED
    error = (await runs.get(run_id)).error
    assert error is not None and error.type == "NondeterminismError"
    assert "step /1:s2" in error.message or "step /1:s2b" in error.message
    assert expected in error.message


def test_cancel_stops_a_running_run_within_a_second() -> None:
    @component
    async def slow() -> None:
        await asyncio.sleep(30)

    @component
    async def never() -> None:
        calls["never"] += 1

    @workflow(name="cancellable")
    async def wf() -> None:
        await slow()
        await never()

    h = start(wf)
    while "step.started" not in [e.type for e in h.events(follow=False)]:  # slow() is running
        time.sleep(0.01)
    t0 = time.monotonic()
    assert h.cancel() is RunStatus.RUNNING  # flagged; the host stops it
    while not h.status.terminal:
        time.sleep(0.01)
    assert time.monotonic() - t0 < 1.0
    assert h.status is RunStatus.CANCELLED and calls["never"] == 0
    assert sig(h)[-2:] == [("step.started", "/0:slow"), ("run.cancelled", None)]
    assert h.cancel() is RunStatus.CANCELLED  # idempotent
