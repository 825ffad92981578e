"""SIGTERM on a worker mid-run: the run is handed back and finishes elsewhere from its journal."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from genx_ray.runs import RunStatus, RunStore
from genx_ray.streams import EventStore

from .conftest import WorkerFactory

pytestmark = pytest.mark.chaos


async def test_sigterm_drain_hands_the_run_over_without_redoing_steps(
    spawn_worker: WorkerFactory, runs: RunStore, events: EventStore
) -> None:
    run = await runs.create("ticker", {"n": 40, "delay": 0.1}, enqueue=True)
    first = spawn_worker("--drain-timeout", "0.3")
    try:
        while sum(e.event.type == "progress" for e in await events.read(run.id)) < 10:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # polling another process's writes
        first.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        while (await runs.get(run.id)).status is RunStatus.RUNNING:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert time.monotonic() - t0 < 5  # drain timeout 0.3 s, then handed back at once
        assert await asyncio.to_thread(first.wait, 60) == 0  # then a clean exit (Ray shuts down)
    finally:
        first.kill()
        first.wait()
    handed_back = await runs.get(run.id)
    assert handed_back.status is RunStatus.QUEUED and handed_back.attempt == 2
    restarted = [e.event for e in await events.read(run.id) if e.event.type == "run.restarted"]
    assert len(restarted) == 1 and "drained" in restarted[0].reason  # type: ignore[union-attr]

    spawn_worker()  # queued while no worker was up: starts when one comes
    async for _ in events.follow(run.id):
        pass
    done = await runs.get(run.id)
    assert done.status is RunStatus.SUCCEEDED and done.output == sum(range(40))

    stored = [e.event for e in await events.read(run.id)]
    completed: dict[str, list[Any]] = {}
    for e in stored:
        if e.type == "step.completed":
            completed.setdefault(e.step.id, []).append(e.replayed)  # type: ignore[union-attr]
    assert len(completed) == 40
    replayed = [sid for sid, flags in completed.items() if flags == [False, True]]
    assert len(replayed) >= 10  # finished before the drain: replayed, not run again
    assert all(flags in ([False], [False, True]) for flags in completed.values())
    ticks = [e.data["i"] for e in stored if e.type == "progress"]  # type: ignore[union-attr,index]
    assert set(ticks) == set(range(40)) and len(ticks) <= 41  # at most the in-flight step twice
