"""Hosts that die or freeze: the run is restarted from its journal, and zombies write nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import pytest

from genx_ray import keys
from genx_ray.runs import RunStatus, RunStore
from genx_ray.streams import EventStore

from .conftest import WorkerFactory

pytestmark = pytest.mark.chaos


async def _progress(events: EventStore, run_id: str) -> int:
    return sum(e.event.type == "progress" for e in await events.read(run_id))


async def _until(predicate: Any, within: float = 90) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def _completed_steps(stored: list[Any]) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = {}
    for e in stored:
        if e.type == "step.completed":
            out.setdefault(e.step.id, []).append(e.replayed)
    return out


async def test_kill_9_of_the_worker_process_group(
    spawn_worker: WorkerFactory, runs: RunStore, events: EventStore
) -> None:
    run = await runs.create("ticker", {"n": 30, "delay": 0.1}, enqueue=True)
    first = spawn_worker()
    await _until(lambda: _progress_at_least(events, run.id, 8))
    host = await runs.redis.hget(keys.run(run.id), "host")
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its local Ray...
    with contextlib.suppress(ProcessLookupError):  # ...and the run host: the machine is gone
        os.kill(int(str(host).rsplit(":", 1)[1]), signal.SIGKILL)
    first.wait()
    killed_at = await _progress(events, run.id)

    spawn_worker()  # its supervisor finds the expired lease and restarts the run
    async for _ in events.follow(run.id):
        pass
    done = await runs.get(run.id)
    assert done.status is RunStatus.SUCCEEDED and done.output == sum(range(30))
    assert done.attempt == 2
    stored = [e.event for e in await events.read(run.id)]
    (restarted,) = [e for e in stored if e.type == "run.restarted"]
    assert restarted.attempt == 2 and "stopped heartbeating" in restarted.reason  # type: ignore[union-attr]
    completed = _completed_steps(stored)
    assert len(completed) == 30
    # Every step that completed before the crash is replayed, not run again.
    assert sum(flags == [False, True] for flags in completed.values()) >= killed_at - 1
    ticks = [e.data["i"] for e in stored if e.type == "progress"]  # type: ignore[union-attr,index]
    assert sorted(set(ticks)) == list(range(30)) and len(ticks) <= 31


async def _progress_at_least(events: EventStore, run_id: str, n: int) -> bool:
    return await _progress(events, run_id) >= n


async def test_a_frozen_host_is_replaced_and_writes_nothing_after(
    spawn_worker: WorkerFactory, runs: RunStore, events: EventStore
) -> None:
    run = await runs.create("ticker", {"n": 20, "delay": 0.1}, enqueue=True)
    spawn_worker()
    await _until(lambda: _progress_at_least(events, run.id, 5))
    host = await runs.redis.hget(keys.run(run.id), "host")
    pid = int(str(host).rsplit(":", 1)[1])
    os.kill(pid, signal.SIGSTOP)  # a zombie: alive, but its heartbeat stops
    try:
        async for _ in events.follow(run.id):  # the supervisor takes over; attempt 2 finishes
            pass
        done = await runs.get(run.id)
        assert done.status is RunStatus.SUCCEEDED and done.attempt == 2
        before = await events.read(run.id)
    finally:
        os.kill(pid, signal.SIGCONT)  # the zombie wakes up mid-step and tries to go on
    await asyncio.sleep(3)
    after = await events.read(run.id)
    assert [e.id for e in after] == [e.id for e in before]  # it wrote nothing
    assert (await runs.get(run.id)).status is RunStatus.SUCCEEDED
    assert await runs.redis.get(keys.lease(run.id)) is None  # and holds no lease


async def test_a_run_whose_hosts_keep_dying_fails_with_the_reason(
    spawn_worker: WorkerFactory, runs: RunStore, events: EventStore
) -> None:
    run = await runs.create("ticker", {"n": 100, "delay": 0.1}, enqueue=True)
    first = spawn_worker(GENX_MAX_ATTEMPTS="1")
    await _until(lambda: _progress_at_least(events, run.id, 3))
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    spawn_worker(GENX_MAX_ATTEMPTS="1")
    async for _ in events.follow(run.id):
        pass
    failed = await runs.get(run.id)
    assert failed.status is RunStatus.FAILED and failed.error is not None
    assert failed.error.type == "RunHostLost" and "1 of 1 attempts" in failed.error.message


async def _host_of_finished_run(runs: RunStore, events: EventStore, run_id: str) -> str:
    async for _ in events.follow(run_id):
        pass
    return str(await runs.redis.hget(keys.run(run_id), "host"))


async def test_a_host_takes_the_next_run_unless_it_died(
    spawn_worker: WorkerFactory, runs: RunStore, events: EventStore
) -> None:
    spawn_worker()  # keeps two hosts warm
    used = []
    # Runs one after the other, whatever their ending, reuse those processes: none is started.
    for workflow, inputs in [("ticker", {"n": 3, "delay": 0.01}), ("boom", {"message": "no"}),
                             ("ticker", {"n": 3, "delay": 0.01}), ("echo", {"text": "hi"})]:  # fmt: skip
        run = await runs.create(workflow, inputs, enqueue=True)
        used.append(await _host_of_finished_run(runs, events, run.id))
        status = (await runs.get(run.id)).status
        assert status is (RunStatus.FAILED if workflow == "boom" else RunStatus.SUCCEEDED)
    assert len(set(used)) <= 2, used

    # A host killed during its run is not handed another one.
    doomed = await runs.create("ticker", {"n": 20, "delay": 0.1}, enqueue=True)
    await _until(lambda: _progress_at_least(events, doomed.id, 2))
    killed = str(await runs.redis.hget(keys.run(doomed.id), "host"))
    os.kill(int(killed.rsplit(":", 1)[1]), signal.SIGKILL)
    after = await runs.create("ticker", {"n": 3, "delay": 0.01}, enqueue=True)
    assert await _host_of_finished_run(runs, events, after.id) != killed
    assert (await runs.get(after.id)).status is RunStatus.SUCCEEDED
    # ...and the killed run finishes elsewhere (the supervisor restarts it).
    assert await _host_of_finished_run(runs, events, doomed.id) != killed
    assert (await runs.get(doomed.id)).status is RunStatus.SUCCEEDED


async def test_one_run_per_host_when_asked(
    spawn_worker: WorkerFactory, runs: RunStore, events: EventStore
) -> None:
    spawn_worker(GENX_HOST_MAX_RUNS="1")  # for code that leaves state behind in its process
    used = []
    for i in range(3):
        run = await runs.create("echo", {"text": str(i)}, enqueue=True)
        used.append(await _host_of_finished_run(runs, events, run.id))
    assert len(set(used)) == 3, used
