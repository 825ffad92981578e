"""The gateway's event hub on a real Redis: whatever moment a reader joins the hub's one blocking
read, it gets every event after its own last id, exactly once, in order."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from gateway.hub import PAGE, EventHub, RawEntry
from genx_ray.model import RunStatus
from genx_ray.model import events as ev
from genx_ray.store import START, EventStore, RunStore, async_redis, keys


async def _ids(batches: AsyncIterator[list[RawEntry]]) -> list[str]:
    return [e.id.decode() for e in await anext(batches)]


async def _ids_until(batches: AsyncIterator[list[RawEntry]], last: str) -> list[str]:
    """The ids of the batches up to the one with ``last`` (live events come as they are read)."""
    got: list[str] = []
    while last not in got:
        got += await asyncio.wait_for(_ids(batches), 10)
    return got


async def test_a_reader_joining_behind_the_hubs_read_in_flight_misses_nothing(
    redis_url: str, redis: Any
) -> None:
    """A reader joins where its replay ended. The replay's reply and the hub's come on two
    connections, either first: the hub may have read past that point already, its next read in
    flight from further on. Forced here by joining at an id the hub has read past."""
    runs, store = RunStore(redis), EventStore(redis)
    run = await runs.create("wf", None)
    await runs.transition(run.id, RunStatus.RUNNING, allowed={RunStatus.QUEUED})
    raw = async_redis(redis_url, decode=False)
    # A long block: the read in flight stays in flight unless the hub wakes it, so the order
    # below is the only one possible, not one a fast machine happens to take.
    hub = EventHub(raw, block_ms=3000)
    await hub.start()
    ahead = hub.stream(run.id, START)
    behind = None
    try:
        [queued] = await _ids(ahead)  # replayed, and joined the hub
        ahead_live = asyncio.ensure_future(_ids(ahead))
        [e3] = await store.append(run.id, ev.OutputEvent(run_id=run.id, data=3))
        assert await ahead_live == [e3]  # the hub's read in flight now starts after e3
        behind = hub._join(run.id, queued)  # a replay that ended at run.queued, its reply late
        [e4] = await store.append(run.id, ev.OutputEvent(run_id=run.id, data=4))
        got: list[RawEntry] = []
        while not got or got[-1].id.decode() != e4:
            got += await asyncio.wait_for(behind.queue.get(), 10)
        assert [e.id.decode() for e in got] == [e3, e4]  # e3 too, though read before it joined
        assert await asyncio.wait_for(_ids(ahead), 10) == [e4]  # and nothing twice
    finally:
        if behind is not None:
            hub._subs[run.id].discard(behind)
        await ahead.aclose()
        await hub.stop()
        await raw.aclose()


async def test_a_replay_page_read_after_the_stream_was_trimmed_past_the_reader_says_so(
    redis_url: str, redis: Any
) -> None:
    runs, store = RunStore(redis), EventStore(redis)
    run = await runs.create("wf", None)
    await runs.transition(run.id, RunStatus.RUNNING, allowed={RunStatus.QUEUED})
    out = [ev.OutputEvent(run_id=run.id, data=i) for i in range(PAGE + 10)]
    ids = [e.id for e in await store.read(run.id)] + await store.append(run.id, *out)
    raw = async_redis(redis_url, decode=False)
    hub = EventHub(raw)
    await hub.start()
    reader = hub.stream(run.id, ids[0])
    try:
        assert await _ids(reader) == ids[1 : PAGE + 1]  # a first page; its client takes it slowly
        await redis.xtrim(keys.events(run.id), maxlen=5, approximate=False)  # meanwhile
        batch = await anext(reader)
        assert batch[0].type == b"events.truncated"  # the next page says so, first
        told = json.loads(batch[0].data)
        assert (told["after"], told["first_available"], told["trimmed"]) == (
            ids[PAGE], ids[-5], len(ids) - 5,
        )  # fmt: skip
        assert [e.id.decode() for e in batch[1:]] == ids[-5:]
    finally:
        await reader.aclose()
        await hub.stop()
        await raw.aclose()


async def test_a_reader_slow_to_take_its_replay_keeps_what_the_hub_read_for_it_meanwhile(
    redis_url: str, redis: Any
) -> None:
    runs, store = RunStore(redis), EventStore(redis)
    run = await runs.create("wf", None)
    await runs.transition(run.id, RunStatus.RUNNING, allowed={RunStatus.QUEUED})
    ids = [e.id for e in await store.read(run.id)]
    ids += await store.append(run.id, *[ev.OutputEvent(run_id=run.id, data=i) for i in range(4)])
    raw = async_redis(redis_url, decode=False)
    hub = EventHub(raw, block_ms=3000)
    await hub.start()
    probe, slow = hub.stream(run.id, ids[-2]), hub.stream(run.id, ids[0])
    probe_live = None
    try:
        assert await _ids(probe) == ids[-1:]  # another reader, that takes what it is sent
        probe_live = asyncio.ensure_future(_ids(probe))
        await asyncio.sleep(0)  # one turn of the loop: it has joined the hub (and waits)
        assert await _ids(slow) == ids[1:]  # caught up; its client is slow to take the page
        more = await store.append(
            run.id, *[ev.OutputEvent(run_id=run.id, data=i) for i in range(8)]
        )
        read = await asyncio.wait_for(probe_live, 10)
        if more[-1] not in read:
            read += await _ids_until(probe, more[-1])
        assert read == more  # the hub has read them: for both readers, the slow one too
        await redis.xtrim(keys.events(run.id), maxlen=2, approximate=False)  # then MAXLEN did
        assert await _ids_until(slow, more[-1]) == more  # what was read for it is kept
    finally:
        if probe_live is not None:  # (a test that failed may leave it waiting)
            probe_live.cancel()
            await asyncio.gather(probe_live, return_exceptions=True)
        await probe.aclose()
        await slow.aclose()
        await hub.stop()
        await raw.aclose()
