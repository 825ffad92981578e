"""Durable waits across real worker processes that die: a waiting or sleeping run holds no host
and survives every worker; a parent restarted after a crash does not start its children again;
a schedule with two workers starts one run per tick."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from typing import Any

import pytest

from genx_ray.model import InputInvalid, Run, RunStatus
from genx_ray.store import EventStore, RunStore, ScheduleStore, keys

from .conftest import WorkerFactory
from .test_crash import _finished, _phases, _ready, _until

pytestmark = pytest.mark.timeout(300)


async def _status(runs: RunStore, run_id: str, status: RunStatus) -> None:
    async def reached() -> bool:
        return (await runs.status(run_id)) is status

    await _until(reached, within=90, every=0.05)


async def _runs_on_hosts(runs: RunStore, killed: Any = None) -> int:
    """Runs the live workers' hosts execute, as their heartbeats report them (the last beat of
    a ``killed`` worker, sent before its run parked, does not count)."""
    beats = {
        name: json.loads(raw) for name, raw in (await runs.redis.hgetall(keys.WORKERS)).items()
    }
    return sum(
        b.get("runs", 0) for name, b in beats.items()
        if time.time() - b["seen"] < 2 and not (killed and name.endswith(f"-{killed.pid}"))
    )  # fmt: skip


def _kill(proc: Any) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the worker, its local Ray and its hosts
    proc.wait()


async def _completed(events: EventStore, run_id: str) -> Counter[tuple[str, bool]]:
    return Counter(
        (e.event.step.id, e.event.replayed)  # type: ignore[union-attr]
        for e in await events.read(run_id)
        if e.type == "step.completed"
    )


async def test_a_run_waiting_for_input_survives_its_worker_and_runs_each_step_once(
    spawn_worker: WorkerFactory, runs: RunStore, events: EventStore
) -> None:
    run = await runs.create("review", {"n": 4}, enqueue=True)
    first = spawn_worker()
    await _status(runs, run.id, RunStatus.WAITING)
    await asyncio.sleep(2)  # a host ping or two: the count below is the hosts' own
    assert await _runs_on_hosts(runs) == 0  # it holds no host while it waits
    _kill(first)
    second = spawn_worker()
    await _ready(runs, second)
    assert (await runs.get(run.id)).status is RunStatus.WAITING  # nothing to restart
    with pytest.raises(InputInvalid, match="approve"):
        await runs.deliver_input(run.id, {"approve": "yes"})  # 422: still waiting after
    await runs.deliver_input(run.id, {"approve": True, "comment": "after a crash"})
    (done,) = await _finished(runs, events, [run.id])
    assert done.status is RunStatus.SUCCEEDED
    assert done.output == {"decision": {"approve": True, "comment": "after a crash"}, "after": 4}
    assert await _phases(events, run.id) == [0, 1, 2, 3]  # published once each
    completed = await _completed(events, run.id)
    assert all(completed[(f"/{i}:work", False)] == 1 for i in range(4))  # ran once each
    assert all(completed[(f"/{i}:work", True)] == 1 for i in range(4))  # then replayed
    requested = [e for e in await events.read(run.id) if e.type == "input.requested"]
    assert len(requested) == 1  # the wait was not asked twice


async def test_a_durable_sleep_across_a_worker_restart_wakes_on_time_holding_no_host(
    spawn_worker: WorkerFactory, runs: RunStore, events: EventStore
) -> None:
    workers = [spawn_worker(), spawn_worker()]
    for proc in workers:
        await _ready(runs, proc)
    run = await runs.create("napper", {"seconds": 3.0}, enqueue=True)
    await _status(runs, run.id, RunStatus.WAITING)
    until = (await runs.get(run.id)).waiting.until.timestamp()  # type: ignore[union-attr]
    ran_on = str(await runs.redis.hget(keys.run(run.id), "worker"))
    (it,) = [p for p in workers if ran_on.endswith(f"-{p.pid}")]
    _kill(it)  # the worker that ran it, and its hosts, are gone while it sleeps
    await asyncio.sleep(1.5)
    assert await _runs_on_hosts(runs, killed=it) == 0  # the sleeping run is in Redis only
    (done,) = await _finished(runs, events, [run.id])
    assert done.status is RunStatus.SUCCEEDED and done.output == "awake"
    woke = next(e.event.ts for e in await events.read(run.id) if e.type == "run.resumed")
    assert until <= woke < until + 1.0, woke - until  # the other worker's timers woke it
    assert await _phases(events, run.id) == [0]
    assert (await _completed(events, run.id))[("/0:work", False)] == 1


async def test_a_parent_restarted_after_a_crash_does_not_start_its_children_again(
    spawn_worker: WorkerFactory, runs: RunStore, events: EventStore
) -> None:
    parent = await runs.create("family", {"children": 3, "n": 12, "delay": 0.3}, enqueue=True)
    first = spawn_worker()

    async def children_started() -> bool:
        started = [e for e in await events.read(parent.id) if e.type == "child.started"]
        return len(started) == 3

    await _until(children_started)
    _kill(first)  # the parent and its children die with the worker mid-run
    spawn_worker()
    (done,) = await _finished(runs, events, [parent.id])
    assert done.status is RunStatus.SUCCEEDED and done.output == [sum(range(12))] * 3
    started = [e.event for e in await events.read(parent.id) if e.type == "child.started"]
    kids = [e.child_id for e in started]  # type: ignore[union-attr]
    assert len(started) == 3 and len(set(kids)) == 3  # started once each, never again
    children: list[Run] = [await runs.get(k) for k in kids]
    assert all(c.parent_id == parent.id and c.status is RunStatus.SUCCEEDED for c in children)
    finished = [e for e in await events.read(parent.id) if e.type == "child.finished"]
    assert len(finished) == 3


async def test_a_schedule_with_two_workers_starts_one_run_per_tick(
    spawn_worker: WorkerFactory, runs: RunStore, events: EventStore
) -> None:
    workers = [spawn_worker(), spawn_worker()]
    for proc in workers:
        await _ready(runs, proc)
    store = ScheduleStore(runs.redis)
    schedule = await store.create(
        "echo", "* * * * * */2", {"text": "tick"}, timezone="UTC", tenant="cron"
    )  # every two seconds
    began = time.time()
    await asyncio.sleep(9)
    await store.delete(schedule.id, tenant="cron")
    ended = time.time()
    started, _ = await runs.list(tenant="cron", limit=100)
    ticks = [t for t in range(int(began) + 1, int(ended) + 1) if t % 2 == 0]
    assert len(started) in (len(ticks) - 1, len(ticks)), (len(started), ticks)
    seconds = Counter(int(r.created_at.timestamp()) // 2 for r in started)
    assert all(n == 1 for n in seconds.values()), seconds  # never two runs for one tick
    done = await _finished(runs, events, [r.id for r in started])
    assert all(r.status is RunStatus.SUCCEEDED and r.output == "TICK" for r in done)
