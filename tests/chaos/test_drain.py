"""SIGTERM on a worker mid-run: every run its host was executing is handed back, stopped on the
host, and finishes elsewhere from its journal."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from genx_ray.model import RunStatus
from genx_ray.store import EventStore, RunStore

from .conftest import WorkerFactory

pytestmark = pytest.mark.timeout(300)


async def test_sigterm_drain_hands_every_run_over_without_redoing_steps(
    spawn_worker: WorkerFactory, runs: RunStore, events: EventStore
) -> None:
    ids = [
        (await runs.create("ticker", {"n": 40, "delay": 0.1}, enqueue=True)).id for _ in range(30)
    ]
    first = spawn_worker("--drain-timeout", "0.3")
    try:

        async def progressed() -> bool:
            counts = [sum(e.type == "progress" for e in await events.read(r)) for r in ids]
            return min(counts) >= 10

        while not await progressed():  # noqa: ASYNC110 - polling another process's writes
            await asyncio.sleep(0.1)
        first.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        while any([(await runs.get(r)).status is RunStatus.RUNNING for r in ids]):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert time.monotonic() - t0 < 5  # drain timeout 0.3 s, then handed back at once
        handed = {r: [e.id for e in await events.read(r)] for r in ids}
        assert await asyncio.to_thread(first.wait, 60) == 0  # then a clean exit (Ray shuts down)
    finally:
        first.kill()
        first.wait()
    for run_id in ids:
        handed_back = await runs.get(run_id)
        assert handed_back.status is RunStatus.QUEUED and handed_back.attempt == 2
        restarted = [e.event for e in await events.read(run_id) if e.type == "run.restarted"]
        assert len(restarted) == 1 and "drained" in restarted[0].reason  # type: ignore[union-attr]
        # The host stopped them: nothing more was written for attempt 1 after the hand-back.
        assert [e.id for e in await events.read(run_id)] == handed[run_id]

    spawn_worker()  # queued while no worker was up: they start when one comes
    for run_id in ids:
        async for _ in events.follow(run_id):
            pass
        done = await runs.get(run_id)
        assert done.status is RunStatus.SUCCEEDED and done.output == sum(range(40))
        stored = [e.event for e in await events.read(run_id)]
        completed: dict[str, list[bool]] = {}
        for e in stored:
            if e.type == "step.completed":
                completed.setdefault(e.step.id, []).append(e.replayed)  # type: ignore[union-attr]
        assert len(completed) == 40
        replayed = [sid for sid, flags in completed.items() if flags == [False, True]]
        assert len(replayed) >= 10  # finished before the drain: replayed, not run again
        assert all(flags in ([False], [False, True]) for flags in completed.values())
        ticks = [e.data["i"] for e in stored if e.type == "progress"]  # type: ignore[union-attr,index]
        assert set(ticks) == set(range(40)) and len(ticks) <= 41  # the in-flight step twice
