"""The supervisor in-process: orphan detection, racing supervisors, the attempt cap, leases."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from genx_ray import keys
from genx_ray.lease import Lease
from genx_ray.runs import RunStatus, RunStore
from genx_ray.settings import Settings
from genx_ray.streams import EventStore
from genx_ray.supervisor import Supervisor

SETTINGS = Settings(lease_seconds=1, max_attempts=3)


async def _orphan(runs: RunStore, redis: Any, attempt: int = 1) -> str:
    """A run left 'running' by a host that died: no lease, an old heartbeat."""
    run = await runs.create("wf", None)
    await runs.transition(run.id, RunStatus.RUNNING, allowed={RunStatus.QUEUED},
                          fields={"attempt": str(attempt)})  # fmt: skip
    await redis.zadd(keys.LEASES, {run.id: time.time() - 60})
    return run.id


async def test_racing_supervisors_restart_an_orphan_once(
    redis: Any, runs: RunStore, events: EventStore
) -> None:
    run_id = await _orphan(runs, redis)
    outcomes = await asyncio.gather(*(Supervisor(redis, SETTINGS)._check(run_id) for _ in range(8)))
    assert sorted(outcomes).count("requeued") == 1
    run = await runs.get(run_id)
    assert run.status is RunStatus.QUEUED and run.attempt == 2
    assert [e.event.type for e in await events.read(run_id)].count("run.restarted") == 1
    queued = await redis.xrange(keys.QUEUE, "-", "+")
    assert sum(f["run"] == run_id for _, f in queued) == 1
    assert await redis.zscore(keys.LEASES, run_id) is None


async def test_a_live_lease_is_left_alone(redis: Any, runs: RunStore, redis_url: str) -> None:
    run_id = await _orphan(runs, redis)
    lease = Lease(redis_url, run_id, 1, ttl=1, on_lost=lambda: None)
    lease.start()
    try:
        await redis.zadd(keys.LEASES, {run_id: time.time() - 60})  # a lagging heartbeat score
        assert await Supervisor(redis, SETTINGS)._check(run_id) == "alive"
        assert (await runs.get(run_id)).status is RunStatus.RUNNING
    finally:
        lease.release()
    assert await redis.get(keys.lease(run_id)) is None


async def test_the_attempt_cap_fails_the_run_with_the_reason(redis: Any, runs: RunStore) -> None:
    run_id = await _orphan(runs, redis, attempt=3)
    assert await Supervisor(redis, SETTINGS)._check(run_id) == "failed"
    run = await runs.get(run_id)
    assert run.status is RunStatus.FAILED and run.error is not None
    assert run.error.type == "RunHostLost" and "3 of 3 attempts" in run.error.message


async def test_a_superseded_lease_stops_and_does_not_release_its_successor(
    redis: Any, runs: RunStore, redis_url: str
) -> None:
    run_id = await _orphan(runs, redis)
    lost = asyncio.Event()
    loop = asyncio.get_running_loop()
    old = Lease(redis_url, run_id, 1, ttl=0.3, on_lost=lambda: loop.call_soon_threadsafe(lost.set))
    old.start()
    await runs.transition(run_id, RunStatus.RUNNING, allowed={RunStatus.RUNNING},
                          fields={"attempt": "2"})  # fmt: skip
    new = Lease(redis_url, run_id, 2, ttl=5, on_lost=lambda: None)
    new.start()
    await asyncio.wait_for(lost.wait(), 2)  # the old one noticed within a renewal period
    old.release()
    assert await redis.get(keys.lease(run_id)) == "2"  # the successor's lease is untouched
    new.release()
