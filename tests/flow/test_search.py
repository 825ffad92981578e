"""Finding runs from indexes: tags, statuses (never missing a run whatever ended it), time ranges,
their intersections, a tenant's own runs only; and 10,000 runs answered in well under 100 ms."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import pytest

from genx_ray.model import (
    ErrorInfo,
    RunFailedEvent,
    RunStartedEvent,
    RunStatus,
    RunSucceededEvent,
)
from genx_ray.store import BatchWriter, Claim, RunFilter, RunStore, keys

Q, R = RunStatus.QUEUED, RunStatus.RUNNING


async def _start(runs: RunStore, run_id: str, attempt: int = 1) -> None:
    event = RunStartedEvent(run_id=run_id, workflow="wf", attempt=attempt)
    (result,) = await runs.claim_many([Claim(run_id, attempt, event, {})], None, watch=False)
    assert not isinstance(result, Exception), result


def _newest_first(*run_ids: str) -> list[str]:
    """Ids sort by creation time to the millisecond (runs made in the same one, at random)."""
    return sorted(run_ids, reverse=True)


async def _ids(runs: RunStore, tenant: str, **filters: Any) -> list[str]:
    page, _ = await runs.list(tenant=tenant, limit=500, **filters)
    return [r.id for r in page]


async def test_every_way_a_run_ends_puts_it_in_its_status_index(redis: Any, runs: RunStore) -> None:
    t = "ends"
    made = [(await runs.create("wf", None, tenant=t)).id for _ in range(5)]
    # 0: cancelled while queued; 1: failed by the supervisor (its host lost); 2: succeeded
    # through a run writer; 3: failed by a transition; 4: still running.
    await runs.request_cancel(made[0])
    for run_id in made[1:]:
        await _start(runs, run_id)
    assert await runs.reap(made[1], 1, max_attempts=1, reason="gone", host_dead=True) == "failed"
    writes = BatchWriter(redis)
    writer = writes.writer(made[2], 1, tenant=t)
    await writer.finish("succeeded", RunSucceededEvent(run_id=made[2], output=1), {},
                        leased=False)  # fmt: skip
    await writes.close()
    error = ErrorInfo(type="E", message="x")
    await runs.transition(made[3], RunStatus.FAILED, allowed={R},
                          event=RunFailedEvent(run_id=made[3], error=error))  # fmt: skip
    assert await _ids(runs, t, status=RunStatus.CANCELLED) == [made[0]]
    assert await _ids(runs, t, status=RunStatus.FAILED) == _newest_first(made[3], made[1])
    assert await _ids(runs, t, status=RunStatus.SUCCEEDED) == [made[2]]
    assert await _ids(runs, t, status=R) == [made[4]]
    assert await _ids(runs, t, status=Q) == []
    # Ended runs left the open index (the writer, the transitions, cancel and reap say so).
    assert await redis.zrange(keys.status_index(t, keys.OPEN), 0, -1) == [made[4]]


async def test_a_stale_index_entry_is_never_shown_and_is_dropped_when_met(
    redis: Any, runs: RunStore
) -> None:
    t = "stale"
    run = await runs.create("wf", None, tenant=t)
    await _start(runs, run.id)
    # A cancel of a running run indexes it as cancelled ahead (its host ends it): it succeeds.
    await runs.request_cancel(run.id)
    writes = BatchWriter(redis)
    await writes.writer(run.id, 1, tenant=t).finish(
        "succeeded", RunSucceededEvent(run_id=run.id), {}, leased=False
    )
    await writes.close()
    cancelled = keys.status_index(t, "cancelled")
    assert await redis.zscore(cancelled, run.id) is not None  # stale, for now
    assert await _ids(runs, t, status=RunStatus.CANCELLED) == []
    assert await redis.zscore(cancelled, run.id) is None  # dropped when met
    assert await _ids(runs, t, status=RunStatus.SUCCEEDED) == [run.id]
    # An expired run is dropped from the indexes it is met in.
    gone = await runs.create("wf", None, tenant=t, tags={"k": "v"})
    await redis.delete(keys.run(gone.id))
    assert await _ids(runs, t, tags=[("k", "v")]) == []
    assert await redis.zscore(keys.tag_index(t, "k", "v"), gone.id) is None


async def test_filters_intersect_and_stay_within_the_tenant(runs: RunStore) -> None:
    a, b = "ten-a", "ten-b"
    both = await runs.create("wf", None, tenant=a, tags={"c": "1", "d": "2"})
    only_c = await runs.create("wf", None, tenant=a, tags={"c": "1"})
    other_wf = await runs.create("other", None, tenant=a, tags={"c": "1", "d": "2"})
    theirs = await runs.create("wf", None, tenant=b, tags={"c": "1", "d": "2"})
    assert await _ids(runs, a, tags=[("c", "1"), ("d", "2")]) == _newest_first(other_wf.id, both.id)
    assert await _ids(runs, a, tags=[("c", "1")], workflow="wf") == _newest_first(
        only_c.id, both.id
    )
    assert await _ids(runs, a, tags=[("c", "1")], workflow="wf", status=Q) == _newest_first(
        only_c.id, both.id
    )
    assert await _ids(runs, b, tags=[("c", "1")]) == [theirs.id]
    assert await _ids(runs, a, tags=[("c", "2")]) == []
    # A page of one at a time: the cursor goes on where the last page stopped.
    seen, cursor = [], None
    while True:
        page, cursor = await runs.list(tenant=a, tags=[("c", "1")], limit=1, cursor=cursor)
        seen += [r.id for r in page]
        if cursor is None:
            break
    assert seen == _newest_first(other_wf.id, only_c.id, both.id)
    found = await runs.find(RunFilter(tags=(("c", "1"),)), tenant=a, ids=[both.id, theirs.id])
    assert [r.id for r in found] == [both.id]


async def test_time_ranges_are_id_ranges(runs: RunStore) -> None:
    t = "times"
    early = await runs.create("wf", None, tenant=t)
    await asyncio.sleep(0.01)
    middle = await runs.create("wf", None, tenant=t)
    await asyncio.sleep(0.01)
    late = await runs.create("wf", None, tenant=t)
    since = middle.created_at.timestamp()
    until = late.created_at.timestamp()
    assert await _ids(runs, t, created_after=since) == [late.id, middle.id]
    assert await _ids(runs, t, created_before=since) == [early.id]
    assert await _ids(runs, t, created_after=since, created_before=until) == [middle.id]


N = 10_000


async def _seed(runs: RunStore, tenant: str) -> float:
    """N runs: 1 in 10 of customer acme, 1 in 100 of batch 2026-12, a tenth failed."""
    started = time.perf_counter()

    async def one(i: int) -> None:
        tags = {"customer": "acme" if i % 10 == 0 else f"c{i % 37}"}
        if i % 100 == 0:
            tags["batch"] = "2026-12"
        run = await runs.create("ingest" if i % 2 else "report", None, tenant=tenant, tags=tags)
        if i % 10 == 3:
            await runs.request_cancel(run.id)

    for at in range(0, N, 500):
        await asyncio.gather(*(one(i) for i in range(at, min(N, at + 500))))
    return time.perf_counter() - started


@pytest.mark.slow  # seeding 10,000 runs takes seconds: not in make test-fast
@pytest.mark.timeout(300)
async def test_filters_over_10000_runs_answer_in_under_100_ms(runs: RunStore) -> None:
    t = "big"
    await _seed(runs, t)
    page, _ = await runs.list(tenant=t, limit=500)
    middle = page[250].created_at.timestamp()
    queries: dict[str, dict[str, Any]] = {
        "tag": {"tags": [("customer", "acme")]},
        "two tags": {"tags": [("customer", "acme"), ("batch", "2026-12")]},
        "tag + status": {"tags": [("customer", "c3")], "status": RunStatus.CANCELLED},
        "status": {"status": RunStatus.CANCELLED},
        "time range": {"created_after": middle},
        "tag + time": {"tags": [("customer", "acme")], "created_before": middle},
        "workflow + tag + status": {"workflow": "ingest", "tags": [("customer", "c3")],
                                    "status": Q},
    }  # fmt: skip
    timings = {}
    for name, q in queries.items():
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            found, _ = await runs.list(tenant=t, limit=50, **q)
            samples.append(time.perf_counter() - t0)
            assert found, name
        timings[name] = statistics.median(samples)
    print({k: f"{v * 1000:.1f} ms" for k, v in timings.items()})
    assert all(v < 0.1 for v in timings.values()), timings
    # Right, not only fast: every run of two tags, and nothing else.
    both, _ = await runs.list(tenant=t, limit=500,
                              tags=[("customer", "acme"), ("batch", "2026-12")])  # fmt: skip
    assert len(both) == N // 100
    assert all(r.tags["customer"] == "acme" and r.tags["batch"] == "2026-12" for r in both)
    cancelled, _ = await runs.list(tenant=t, limit=500, status=RunStatus.CANCELLED,
                                   tags=[("batch", "2026-12")])  # fmt: skip
    assert cancelled == []  # i % 100 == 0 is never i % 10 == 3
    counts, complete = await runs.counts(tenant=t)
    assert complete and counts["cancelled"] == N // 10 and counts["queued"] == N - N // 10


async def test_runs_indexed_before_the_status_indexes_are_added_to_them_once(
    redis: Any, runs: RunStore
) -> None:
    from genx_ray.store import backfill_status_indexes

    t = "older"
    done = await runs.create("wf", None, tenant=t)
    await runs.request_cancel(done.id)
    live = await runs.create("wf", None, tenant=t)
    for key in keys.status_indexes(t):  # as a Redis of an earlier version has them: none
        await redis.delete(key)
    await redis.delete(keys.STATUS_INDEXES_FILLED)
    assert await _ids(runs, t, status=RunStatus.CANCELLED) == []
    assert await backfill_status_indexes(redis) >= 2
    assert await _ids(runs, t, status=RunStatus.CANCELLED) == [done.id]
    assert await _ids(runs, t, status=Q) == [live.id]
    assert await backfill_status_indexes(redis) == 0  # once
