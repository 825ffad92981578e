from __future__ import annotations

import asyncio
import random

import pytest
from unit.test_events import EXAMPLES

from genx_ray.model import Fenced, RunNotFound, RunStatus
from genx_ray.model import events as ev
from genx_ray.store import EventStore, RunStore, keys


async def _running_run(runs: RunStore) -> str:
    run = await runs.create("wf", {"n": 1})
    await runs.transition(run.id, RunStatus.RUNNING, allowed={RunStatus.QUEUED})
    return run.id


async def test_resume_after_returns_exactly_later_events_during_concurrent_appends(
    runs: RunStore, events: EventStore
) -> None:
    run_id = await _running_run(runs)
    total = 600

    async def writer() -> None:
        for start in range(0, total, 20):
            batch = [
                ev.ProgressEvent(run_id=run_id, kind="n", data=i) for i in range(start, start + 20)
            ]
            await events.append(run_id, *batch)
            await asyncio.sleep(0.001)
        await runs.transition(
            run_id, RunStatus.SUCCEEDED, allowed={RunStatus.RUNNING},
            event=ev.RunSucceededEvent(run_id=run_id),
        )  # fmt: skip

    async def resumer(rng: random.Random) -> list[int]:
        """Follow, drop the connection at random points, resume after the last id seen."""
        seen: list[int] = []
        after = "0-0"
        while True:
            cut = rng.randint(1, 120)
            done = False
            async for entry in events.follow(run_id, after, block_ms=200):
                after = entry.id
                if entry.event.type == "progress":
                    seen.append(entry.event.data)  # type: ignore[union-attr,arg-type]
                if entry.event.type == "run.succeeded":
                    done = True
                cut -= 1
                if cut == 0:
                    break
            if done:
                return seen

    results = await asyncio.gather(writer(), *(resumer(random.Random(s)) for s in range(4)))
    for seen in results[1:]:
        assert seen == list(range(total))  # none lost, none repeated, in order

    full = await events.read(run_id)
    for cut in (0, 1, 137, len(full) - 1):
        after = await events.read(run_id, full[cut].id)
        assert [e.id for e in after] == [e.id for e in full[cut + 1 :]]


async def test_follow_returns_when_terminal_event_was_written_before(
    runs: RunStore, events: EventStore
) -> None:
    run_id = await _running_run(runs)
    await runs.transition(
        run_id, RunStatus.FAILED, allowed={RunStatus.RUNNING},
        event=ev.RunFailedEvent(run_id=run_id, error=ev.ErrorInfo(type="E", message="m")),
    )  # fmt: skip
    got = await asyncio.wait_for(_collect(events.follow(run_id, block_ms=10_000)), 2)
    assert [e.event.type for e in got] == ["run.queued", "run.failed"]
    last = got[-1].id
    # Resuming after the terminal event must not hang either: the run is over.
    assert await asyncio.wait_for(_collect(events.follow(run_id, last, block_ms=100)), 2) == []


async def test_follow_ends_on_live_terminal_event(runs: RunStore, events: EventStore) -> None:
    run_id = await _running_run(runs)
    follower = asyncio.create_task(_collect(events.follow(run_id, block_ms=10_000)))
    await asyncio.sleep(0.05)
    await events.append(run_id, ev.OutputEvent(run_id=run_id, data="a"))
    await runs.transition(
        run_id, RunStatus.CANCELLED, allowed={RunStatus.RUNNING},
        event=ev.RunCancelledEvent(run_id=run_id),
    )  # fmt: skip
    got = await asyncio.wait_for(follower, 2)
    assert [e.event.type for e in got] == ["run.queued", "output", "run.cancelled"]


async def test_follow_of_unknown_run_raises(events: EventStore) -> None:
    with pytest.raises(RunNotFound):
        await _collect(events.follow("run_nope", block_ms=50))


async def test_retention_caps_length_and_expires_finished_runs(redis: object) -> None:
    small = EventStore(redis, maxlen=10)  # type: ignore[arg-type]
    store = RunStore(redis, maxlen=10, retention_seconds=120)  # type: ignore[arg-type]
    run = await store.create("wf", None)
    await store.transition(run.id, RunStatus.RUNNING, allowed={RunStatus.QUEUED})
    for _ in range(10):
        await small.append(run.id, *[ev.OutputEvent(run_id=run.id, data="x")] * 100)
    length = await redis.xlen(keys.events(run.id))  # type: ignore[attr-defined]
    assert 10 <= length < 1000  # approximate trimming keeps at least maxlen, far fewer than 1000
    assert await redis.ttl(keys.events(run.id)) == -1  # type: ignore[attr-defined]  # live: kept
    await store.transition(
        run.id,
        RunStatus.SUCCEEDED,
        allowed={RunStatus.RUNNING},
        event=ev.RunSucceededEvent(run_id=run.id),
    )
    for key in keys.run_keys(run.id)[:2]:
        assert 0 < await redis.ttl(key) <= 120  # type: ignore[attr-defined]


async def test_fenced_append_rejects_a_superseded_attempt(
    runs: RunStore, events: EventStore
) -> None:
    run_id = await _running_run(runs)
    await events.append_fenced(run_id, 1, [ev.OutputEvent(run_id=run_id, data=1)], [("s", "v")])
    await runs.transition(  # a restart takes over with attempt 2
        run_id, RunStatus.RUNNING, allowed={RunStatus.RUNNING}, fields={"attempt": "2"}
    )
    with pytest.raises(Fenced):
        await events.append_fenced(
            run_id, 1, [ev.OutputEvent(run_id=run_id, data=2)], [("s2", "v")]
        )
    assert [e.event.type for e in await events.read(run_id)] == ["run.queued", "output"]
    assert await events.redis.hgetall(keys.journal(run_id)) == {"s": "v"}


async def _collect(it: object) -> list:  # type: ignore[type-arg]
    return [e async for e in it]  # type: ignore[attr-defined]


async def test_stream_round_trip_every_type(events: EventStore) -> None:
    run_id = "run_roundtrip"
    examples = list(EXAMPLES.values())
    ids = await events.append(run_id, *examples)
    assert len(ids) == len(examples) and ids == sorted(
        ids, key=lambda i: tuple(map(int, i.split("-")))
    )
    stored = await events.read(run_id)
    assert [s.id for s in stored] == ids
    assert [s.type for s in stored] == [e.type for e in examples]  # type: ignore[attr-defined]
    assert [s.event for s in stored] == examples
