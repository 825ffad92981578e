"""The supervisor in-process: orphan detection, racing supervisors, the attempt cap, leases, dead
workers whose runs died with them, and the run indexes it trims."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from genx_ray.model import RunId, RunStatus, Settings, new_run_id
from genx_ray.service import Supervisor
from genx_ray.store import EventStore, Leases, RunStore, keys

SETTINGS = Settings(lease_seconds=1, max_attempts=3)


async def _orphan(runs: RunStore, redis: Any, attempt: int = 1, **fields: str) -> str:
    """A run left 'running' by a host that died: no lease, an old heartbeat."""
    run = await runs.create("wf", None, extra=fields)
    await runs.transition(run.id, RunStatus.RUNNING, allowed={RunStatus.QUEUED},
                          fields={"attempt": str(attempt), **fields})  # fmt: skip
    await redis.zadd(keys.LEASES, {run.id: time.time() - 60})
    return run.id


def _leases(redis_url: str, ttl: float, lost: list[tuple[str, int]] | None = None) -> Leases:
    return Leases(
        redis_url, ttl,
        on_lost=lambda r, a: (lost if lost is not None else []).append((r, a)),
        on_cancel=lambda r, a: None,
    )  # fmt: skip


async def test_racing_supervisors_restart_an_orphan_once(
    redis: Any, runs: RunStore, events: EventStore
) -> None:
    run_id = await _orphan(runs, redis)
    outcomes = await asyncio.gather(*(Supervisor(redis, SETTINGS)._check(run_id) for _ in range(8)))
    assert sorted(outcomes).count("requeued") == 1
    run = await runs.get(run_id)
    assert run.status is RunStatus.QUEUED and run.attempt == 2
    assert [e.event.type for e in await events.read(run_id)].count("run.restarted") == 1
    queued = [json.loads(e) for e in await redis.zrange(f"{keys.QUEUE}:q:3:default", 0, -1)]
    assert [e[:2] for e in queued if e[0] == run_id] == [[run_id, 2]]  # queued once
    assert await redis.zscore(keys.LEASES, run_id) is None


async def test_a_live_lease_is_left_alone(redis: Any, runs: RunStore, redis_url: str) -> None:
    run_id = await _orphan(runs, redis)
    await redis.set(keys.lease(run_id), "1", px=1000)  # as the claim sets it
    leases = _leases(redis_url, ttl=1)
    leases.hold(run_id, 1)
    try:
        await redis.zadd(keys.LEASES, {run_id: time.time() - 60})  # a lagging heartbeat score
        await asyncio.sleep(0.5)  # a renewal or two
        assert await Supervisor(redis, SETTINGS)._check(run_id) == "alive"
        assert (await runs.get(run_id)).status is RunStatus.RUNNING
    finally:
        leases.close()


async def test_the_attempt_cap_fails_the_run_with_the_reason(redis: Any, runs: RunStore) -> None:
    run_id = await _orphan(runs, redis, attempt=5, lost="2")  # two lost before (and a wait)
    assert await Supervisor(redis, SETTINGS)._check(run_id) == "failed"
    run = await runs.get(run_id)
    assert run.status is RunStatus.FAILED and run.error is not None
    assert run.error.type == "RunHostLost" and "3 of 3 attempts" in run.error.message


async def test_a_run_started_from_a_script_is_failed_not_requeued(
    redis: Any, runs: RunStore
) -> None:
    run_id = await _orphan(runs, redis, origin="local")
    assert await Supervisor(redis, SETTINGS)._check(run_id) == "failed"
    run = await runs.get(run_id)
    assert run.status is RunStatus.FAILED and run.error is not None
    assert "genx_ray.start()" in run.error.message and "not restarted" in run.error.message


async def test_one_renewal_round_trip_covers_every_lease_and_stops_the_superseded(
    redis: Any, runs: RunStore, redis_url: str
) -> None:
    ids = [await _orphan(runs, redis) for _ in range(50)]
    lost: list[tuple[str, int]] = []
    leases = _leases(redis_url, ttl=60, lost=lost)
    try:
        for run_id in ids:
            leases.hold(run_id, 1)
        await runs.transition(ids[0], RunStatus.RUNNING, allowed={RunStatus.RUNNING},
                              fields={"attempt": "2"})  # fmt: skip  # a restart took it over
        await runs.request_cancel(ids[1])
        outcomes = await asyncio.to_thread(leases.renew_all)
        assert outcomes[ids[0]] == 0 and outcomes[ids[1]] == 2
        assert all(outcomes[r] == 1 for r in ids[2:])
        assert lost == [(ids[0], 1)] and leases.held == 49
        assert await redis.mget([keys.lease(r) for r in ids[1:]]) == ["1"] * 49
        assert await redis.get(keys.lease(ids[0])) is None  # the successor's, if any, is untouched
        scores = await redis.zmscore(keys.LEASES, ids[1:])
        assert all(s is not None and s > time.time() - 5 for s in scores)
    finally:
        leases.close()


async def test_the_runs_of_a_dead_worker_that_shared_their_fate_restart_at_once(
    redis: Any, runs: RunStore
) -> None:
    mine = await _orphan(runs, redis, worker="w-dead")
    other = await _orphan(runs, redis, worker="w-alive")
    own = await _orphan(runs, redis, worker="w-cluster")
    for run_id in (mine, other, own):  # every lease is live: only the worker's death counts
        await redis.set(keys.lease(run_id), "1", px=60_000)
    now = time.time()
    await redis.hset(keys.WORKERS, mapping={
        "w-dead": json.dumps({"version": "v", "draining": False, "seen": now - 10, "fate": "shared"}),
        "w-alive": json.dumps({"version": "v", "draining": False, "seen": now, "fate": "shared"}),
        "w-cluster": json.dumps({"version": "v", "draining": False, "seen": now - 10, "fate": "own"}),
    })  # fmt: skip
    try:
        assert await Supervisor(redis, SETTINGS).sweep_workers() == {"requeued": 1}
        assert (await runs.get(mine)).status is RunStatus.QUEUED
        assert (await runs.get(other)).status is RunStatus.RUNNING
        assert (await runs.get(own)).status is RunStatus.RUNNING  # its hosts outlive it
        assert not await redis.hexists(keys.WORKERS, "w-dead")
    finally:
        await redis.hdel(keys.WORKERS, "w-alive", "w-cluster")


async def test_expired_runs_leave_the_run_indexes(redis: Any, runs: RunStore) -> None:
    def old(minutes: float) -> RunId:
        return new_run_id(time.time() - 60 * minutes)

    kept = await runs.create("trim", None, tenant="trimmer", run_id=old(10))
    gone = [await runs.create("trim", None, tenant="trimmer", run_id=old(5)) for _ in range(3)]
    await redis.delete(*(keys.run(r.id) for r in gone))  # as if past their retention
    young = await runs.create("trim", None, tenant="trimmer")  # indexed, not created yet:
    await redis.delete(keys.run(young.id))  # a create in flight must keep its index entry
    removed = await Supervisor(redis, SETTINGS).trim_indexes(batch=2)
    assert removed >= 6  # from the tenant's index and its workflow's
    for index in (keys.run_index("trimmer"), keys.run_index("trimmer", "trim")):
        assert await redis.zrange(index, 0, -1) == [kept.id, young.id]
