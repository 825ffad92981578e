"""The run queue's order: most urgent first; within a priority, tenants in turn (weighted), then
FIFO; a backlog of one tenant never holds another's runs for more than a round; a dead worker's
taken entries go to another worker at once, a live one's stay. On single Redis and Redis Cluster
(every queue key in one slot: one script takes a batch)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import wf_fixtures  # noqa: F401 - registers the test workflows

from genx_ray.flow import registry
from genx_ray.model import RunStatus, Settings
from genx_ray.service import Worker
from genx_ray.store import RunQueue, RunStore, async_redis, keys, queue_depths


@pytest.fixture(autouse=True)
async def empty_queue(redis: Any) -> None:
    """Only this test's entries (the module's Redis is shared by its tests)."""
    stale = [k async for k in redis.scan_iter(match="{genx:queue}*")]
    for key in stale:  # one by one: a cluster client deletes one slot per call anyway
        await redis.delete(key)
    await redis.delete(keys.WORKERS)


async def _queue(runs: RunStore, n: int, tenant: str = "q-default", priority: int = 3) -> list[str]:
    return [
        (await runs.create("echo", {"text": "x"}, tenant=tenant, enqueue=True,
                           priority=priority)).id
        for _ in range(n)
    ]  # fmt: skip


async def _take_all(queue: RunQueue, n: int, batch: int = 1) -> list[str]:
    got: list[str] = []
    while len(got) < n:
        taken = await queue.take("w", batch)
        assert taken, f"the queue ran dry after {len(got)}"
        got += [e.run_id for e in taken]
    return got


async def test_more_urgent_first_then_fifo(redis: Any, runs: RunStore) -> None:
    low = await _queue(runs, 2, priority=5)
    mid = await _queue(runs, 2)
    urgent = await _queue(runs, 2, priority=1)
    queue = RunQueue(redis)
    assert await _take_all(queue, 6, batch=4) == urgent + mid + low
    assert await queue.take("w", 10) == []
    assert (await runs.get(urgent[0])).priority == 1


async def test_a_tenants_backlog_does_not_hold_anothers_runs(redis: Any, runs: RunStore) -> None:
    a = await _queue(runs, 40, tenant="q-a")
    queue = RunQueue(redis)
    first = await _take_all(queue, 10, batch=5)
    assert first == a[:10]
    b = await _queue(runs, 3, tenant="q-b")  # b arrives behind a's backlog of 30
    order = await _take_all(queue, 33, batch=1)
    assert order[:6] == [b[0], a[10], b[1], a[11], b[2], a[12]]  # in turn, from the next slot
    assert order[6:] == a[13:]
    # b joined at the clock: its idle past earned it no burst ahead of a
    queue_a = await _queue(runs, 4, tenant="q-a")
    queue_b = await _queue(runs, 4, tenant="q-b")
    assert sorted(await _take_all(queue, 4, batch=4)) == sorted(queue_a[:2] + queue_b[:2])


async def test_weights_share_the_queue(redis: Any, runs: RunStore) -> None:
    queue = RunQueue(redis)
    await queue.set_weights({"q-heavy": 3})
    heavy = await _queue(runs, 30, tenant="q-heavy")
    await _queue(runs, 30, tenant="q-light")
    first = await _take_all(queue, 20, batch=5)
    took = sum(r in heavy for r in first)
    assert 14 <= took <= 16, took  # 3 to 1, give or take the round in progress
    depths = {(d.tenant, d.priority): d.depth for d in await queue_depths(redis)}
    assert depths == {("q-heavy", 3): 30 - took, ("q-light", 3): 10 + took}


async def test_a_dead_workers_entries_go_to_another_a_live_ones_stay(
    redis: Any, runs: RunStore
) -> None:
    ids = await _queue(runs, 6)
    queue = RunQueue(redis, dead_after=1.0)
    now = time.time()
    await redis.hset(keys.WORKERS, mapping={
        "slow": json.dumps({"seen": now}), "dead": json.dumps({"seen": now - 1.5}),
    })  # fmt: skip
    slow = await queue.take("slow", 3)
    dead = await queue.take("dead", 3)
    assert [e.run_id for e in slow + dead] == ids
    assert await queue.stranded("other", 10) != []  # (the dead one's, now the other's)
    assert {e.run_id for e in await queue.held("other")} == set(ids[3:])
    assert await queue.held("dead") == []
    assert {e.run_id for e in await queue.held("slow")} == set(ids[:3])  # alive: kept
    assert await queue.holding(["slow", "dead", "other"]) == {"slow", "other"}
    await queue.ack(*(e.id for e in slow))
    assert await queue.holding(["slow", "dead", "other"]) == {"other"}


async def test_a_worker_starts_urgent_runs_first(redis_url: str, runs: RunStore) -> None:
    low = await _queue(runs, 3, priority=5)
    mid = await _queue(runs, 3, tenant="q-other")
    urgent = await _queue(runs, 3, priority=1)
    client = async_redis(redis_url)
    w = Worker(client, registry=registry, settings=Settings(), max_runs=1, drain_timeout=1,
               redis_url=redis_url, name=f"w-{time.monotonic_ns()}")  # fmt: skip
    task = asyncio.create_task(w.serve())
    try:
        deadline = time.monotonic() + 30
        while True:
            done = await asyncio.gather(*(runs.get(r) for r in low + mid + urgent))
            if all(r.status is RunStatus.SUCCEEDED for r in done):
                break
            assert time.monotonic() < deadline, [r.status for r in done]
            await asyncio.sleep(0.05)
    finally:
        w.stop()
        await task
        await client.aclose()
    started = sorted(done, key=lambda r: r.started_at)  # type: ignore[arg-type,return-value]
    assert [r.id for r in started] == urgent + mid + low


async def test_runs_an_older_version_queued_on_the_stream_are_moved_over(
    redis: Any, runs: RunStore
) -> None:
    run = await runs.create("echo", {"text": "x"}, tenant="q-old", priority=2)
    await redis.xadd(keys.OLD_QUEUE, {"run": run.id, "attempt": "1", "workflow": "echo"})
    queue = RunQueue(redis)
    assert await queue.move_old_queue() == 1
    assert await queue.move_old_queue() == 0  # moved once
    (entry,) = await queue.take("w", 10)
    assert (entry.run_id, entry.attempt, entry.priority, entry.tenant) == (run.id, 1, 2, "q-old")
