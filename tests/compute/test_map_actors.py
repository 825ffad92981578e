"""Component.map over the Ray cluster (map actors), on the session's one-node local Ray. The
multi-node behaviour (spread, per-node caps, labels) is tests/chaos/test_multinode_map.py."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import redis as sync_redis_mod
from helpers import execute

from genx_ray import component, start, workflow
from genx_ray.flow import Registry
from genx_ray.model import RunRestartedEvent, RunStatus, StepError
from genx_ray.store import RunStore

pytestmark = pytest.mark.usefixtures("ray_local")
reg = Registry()


def _redis() -> sync_redis_mod.Redis:
    return sync_redis_mod.Redis.from_url(os.environ["GENX_REDIS_URL"], decode_responses=True)


@component(remote=True)
async def square(x: int) -> int:
    if x % 7 == 3:
        raise ValueError(f"{x} is unlucky")
    return x * x


@workflow(name="pool-squares", registry=reg)
async def squares(n: int) -> list[Any]:
    out = await square.map(range(n), concurrency=16)
    return [o if isinstance(o, int) else f"{type(o).__name__}: {o}" for o in out]


@component(remote=True)
async def counted(item: tuple[int, str]) -> int:
    from genx_ray.store import async_redis

    x, tag = item
    client = async_redis(os.environ["GENX_REDIS_URL"])
    await client.hincrby(f"test:pool:{tag}", str(x), 1)  # how many times each item ran
    await asyncio.sleep(0.1)
    await client.aclose()
    return x


@workflow(name="pool-counted", registry=reg)
async def counted_wf(n: int, tag: str) -> int:
    out = await counted.map([(i, tag) for i in range(n)], concurrency=4)
    return sum(isinstance(o, int) for o in out)


def test_results_in_order_with_errors_in_place() -> None:
    out = start(squares, {"n": 30}).result(120)
    assert out == [
        f"StepError: step /0:square.map/{x}:square failed after 1 attempt(s): ValueError: {x} is"
        " unlucky" if x % 7 == 3 else x * x
        for x in range(30)
    ]  # fmt: skip


def test_outside_a_run_map_still_uses_the_pool() -> None:
    out = asyncio.run(square.map(range(10)))
    assert [o if isinstance(o, int) else "err" for o in out] == [
        "err" if x % 7 == 3 else x * x for x in range(10)
    ]
    assert isinstance(out[3], StepError)


def test_a_cached_component_maps_only_what_its_cache_lacks() -> None:
    tag = os.urandom(4).hex()
    cached = counted.with_cache(ttl=60)
    first = asyncio.run(cached.map([(i, tag) for i in range(10)]))
    assert first == list(range(10))
    again = asyncio.run(cached.map([(i, tag) for i in range(15)]))  # 10 known, 5 new
    assert again == list(range(15))
    runs = _redis().hgetall(f"test:pool:{tag}")
    assert runs == {str(i): "1" for i in range(15)}  # each item ran once


def test_progress_events_stay_few_for_10k_items() -> None:
    handle = start(squares, {"n": 10_000})
    out = handle.result(300)
    assert len(out) == 10_000 and out[9998] == 9998 * 9998
    events = [e.event for e in handle.events(follow=False)]
    progress = [e for e in events if e.type == "progress"]
    duration = handle.get().finished_at - handle.get().started_at  # type: ignore[operator]
    assert 1 <= len(progress) <= 2 * duration.total_seconds() + 2  # a couple a second at most
    last = progress[-1].data  # type: ignore[attr-defined]
    assert (last["done"], last["failed"], last["total"]) == (10_000, 1429, 10_000)
    assert [e.type for e in events][:3] == ["run.queued", "run.started", "step.started"]


async def test_a_restarted_run_does_not_redo_finished_items(redis: Any, runs: RunStore) -> None:
    tag = os.urandom(4).hex()
    run = await runs.create("pool-counted", {"n": 40, "tag": tag})
    host = asyncio.create_task(execute(redis, run.id, reg))
    journal = f"genx:run:{{{run.id}}}:journal"
    while await redis.hlen(journal) < 12:  # noqa: ASYNC110 - polling the journal
        await asyncio.sleep(0.02)
    host.cancel()  # the run host dies mid-batch
    with pytest.raises(asyncio.CancelledError):
        await host
    finished = {k.split("/")[-1].split(":")[0] for k in await redis.hkeys(journal)}
    await runs.transition(
        run.id, RunStatus.QUEUED, allowed={RunStatus.RUNNING}, fields={"attempt": "2"},
        event=RunRestartedEvent(run_id=run.id, attempt=2, reason="heartbeat lost"),
    )  # fmt: skip
    assert await execute(redis, run.id, reg) == RunStatus.SUCCEEDED
    assert (await runs.get(run.id)).output == 40
    ran = {int(k): int(v) for k, v in (await redis.hgetall(f"test:pool:{tag}")).items()}
    assert sorted(ran) == list(range(40))  # every item ran...
    assert all(ran[int(i)] == 1 for i in finished)  # ...and the journaled ones only once
    assert len(finished) >= 12


def test_the_item_runs_in_its_run(redis_url: str) -> None:
    """Inside the map actor, publish() reaches the run's stream with the item's step."""
    handle = start(publishing, {"n": 3})
    assert handle.result(60) == 3
    notes = [e.event for e in handle.events(follow=False) if e.event.type == "progress"]
    items = sorted(
        (e.data["i"], e.step.id)  # type: ignore[attr-defined,union-attr]
        for e in notes
        if e.kind == "note"  # type: ignore[attr-defined]
    )
    assert items == [(i, f"/0:note.map/{i}:note") for i in range(3)]


@component(remote=True)
async def note(i: int) -> int:
    from genx_ray import publish

    publish("note", {"i": i})
    return i


@workflow(name="pool-publishing", registry=reg)
async def publishing(n: int) -> int:
    return len(await note.map(range(n)))


# -- the map a user writes first: an unplaced component ------------------------------------------


@component
async def where(x: int) -> int:
    """Unplaced: where it runs is the map's choice."""
    return os.getpid()


@workflow(name="pool-auto", registry=reg)
async def auto(n: int, spread: bool | None = None) -> list[int]:
    return await where.map(range(n), concurrency=32, spread=spread)  # type: ignore[return-value]


def test_a_large_map_of_an_unplaced_component_goes_to_the_pool_actors() -> None:
    here = os.getpid()  # the run executes in this process (genx_ray.start), on the session Ray
    large = start(auto, {"n": 200}).result(120)
    assert here not in large and len(set(large)) >= 1  # every item ran in a map actor
    assert set(start(auto, {"n": 20}).result(60)) == {here}  # a small map stays on the run loop
    forced = start(auto, {"n": 200, "spread": False}).result(60)
    assert set(forced) == {here}  # spread=False keeps it here whatever its size
    assert here not in start(auto, {"n": 5, "spread": True}).result(60)


@workflow(name="pool-unpicklable", registry=reg)
async def unpicklable(n: int) -> int:
    import threading

    lock = threading.Lock()  # a lock in the closure: the function cannot go to another process

    @component(name="locked")
    async def locked(x: int) -> int:
        with lock:
            return os.getpid()

    return len(set(await locked.map(range(n), concurrency=16)))


def test_a_map_whose_function_cannot_be_sent_stays_on_the_run_loop_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="genx_ray.mapping"):
        assert start(unpicklable, {"n": 150}).result(60) == 1  # all here, and correct
    assert any("cannot be sent to the map actors" in r.getMessage() for r in caplog.records)
