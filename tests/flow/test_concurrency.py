"""Concurrency keys: at most ``limit`` runs of a workflow per key value at once (counted from
inside the workflow), the others queued holding no slot, started in order as places free, each
saying why it waits; a held run can be cancelled. On single Redis and Redis Cluster."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import wf_fixtures  # noqa: F401 - registers the test workflows
from helpers import serving

from genx_ray.model import RunStatus
from genx_ray.store import ConcurrencyKeys, EventStore, RunStore


async def _done(runs: RunStore, ids: list[str], within: float = 30) -> list[Any]:
    deadline = time.monotonic() + within
    while True:
        got = await asyncio.gather(*(runs.get(r) for r in ids))
        if all(r.status.terminal for r in got):
            return list(got)
        assert time.monotonic() < deadline, [r.status for r in got]
        await asyncio.sleep(0.05)


async def test_at_most_limit_runs_per_key_the_rest_wait_in_order(
    redis_url: str, runs: RunStore, events: EventStore
) -> None:
    tag = f"{time.monotonic_ns()}"
    a = [(await runs.create("keyed", {"user": f"a{tag}", "hold": 0.3}, enqueue=True)).id
         for _ in range(6)]  # fmt: skip
    b = [(await runs.create("keyed", {"user": f"b{tag}", "hold": 0.3}, enqueue=True)).id
         for _ in range(6)]  # fmt: skip
    async with serving(redis_url):
        done = await _done(runs, a + b)
    assert all(r.status is RunStatus.SUCCEEDED for r in done), [r.error for r in done]
    peaks = [r.output for r in done]
    assert max(peaks) == 2, peaks  # the limit, reached and never passed, for each key
    for group in (a, b):  # in order within a key (the two let go at once: either first)
        by_start = sorted(group, key=lambda r: next(d.started_at for d in done if d.id == r))
        assert all(abs(by_start.index(r) - i) <= 1 for i, r in enumerate(group)), "order"
    told = 0
    for run_id in a[2:] + b[2:]:
        seq = [(e.type, getattr(e.event, "reason", None)) for e in await events.read(run_id)]
        assert seq.count(("run.queued", "concurrency_key")) <= 1
        told += ("run.queued", "concurrency_key") in seq
        assert seq.count(("run.started", None)) == 1
    assert told >= 6, told  # the runs held back said why


async def test_a_run_held_by_its_key_can_be_cancelled(
    redis_url: str, runs: RunStore, events: EventStore
) -> None:
    user = f"c{time.monotonic_ns()}"
    ids = [(await runs.create("keyed", {"user": user, "hold": 1.5}, enqueue=True)).id
           for _ in range(3)]  # fmt: skip
    async with serving(redis_url):
        deadline = time.monotonic() + 20
        while True:  # until the third is held by its key
            reasons = [getattr(e.event, "reason", None) for e in await events.read(ids[2])]
            if "concurrency_key" in reasons:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert (await runs.get(ids[2])).status is RunStatus.QUEUED
        assert await ConcurrencyKeys(runs.redis).held() >= 1  # /metrics shows it
        await runs.request_cancel(ids[2], "not needed")
        done = await _done(runs, ids)
    assert [r.status for r in done] == [RunStatus.SUCCEEDED] * 2 + [RunStatus.CANCELLED]
    assert "run.started" not in [e.type for e in await events.read(ids[2])]
