from __future__ import annotations

import asyncio

import pytest

from genx_ray.model import (
    InvalidTransition,
    RunNotFound,
    RunStatus,
    UserError,
    is_run_id,
    new_run_id,
)
from genx_ray.model import events as ev
from genx_ray.store import EventStore, RunStore, keys

R, Q = RunStatus.RUNNING, RunStatus.QUEUED


async def test_create_and_get(runs: RunStore, events: EventStore) -> None:
    run = await runs.create("onboard", {"url": "http://x"}, tenant="acme")
    assert is_run_id(run.id)
    got = await runs.get(run.id)
    assert got.status is Q and got.input == {"url": "http://x"} and got.attempt == 1
    assert [e.event.type for e in await events.read(run.id)] == ["run.queued"]
    with pytest.raises(RunNotFound):
        await runs.get(run.id, tenant="someone-else")
    with pytest.raises(RunNotFound):
        await runs.get(new_run_id())


async def test_only_one_of_many_concurrent_finishers_wins(
    runs: RunStore, events: EventStore
) -> None:
    run = await runs.create("wf", None)
    await runs.transition(run.id, R, allowed={Q})

    async def finish(i: int) -> str:
        target = [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED][i % 3]
        event = {
            RunStatus.SUCCEEDED: ev.RunSucceededEvent(run_id=run.id, output=i),
            RunStatus.FAILED: ev.RunFailedEvent(
                run_id=run.id, error=ev.ErrorInfo(type="E", message="")
            ),
            RunStatus.CANCELLED: ev.RunCancelledEvent(run_id=run.id),
        }[target]
        try:
            await runs.transition(run.id, target, allowed={R}, event=event)
            return target.value
        except InvalidTransition:
            return "lost"

    outcomes = await asyncio.gather(*(finish(i) for i in range(30)))
    winners = [o for o in outcomes if o != "lost"]
    assert len(winners) == 1
    assert (await runs.status(run.id)).value == winners[0]
    types = [e.event.type for e in await events.read(run.id)]
    assert types == ["run.queued", f"run.{winners[0]}"]  # exactly one terminal event


async def test_no_transition_out_of_a_terminal_status(runs: RunStore) -> None:
    run = await runs.create("wf", None)
    await runs.transition(run.id, R, allowed={Q})
    await runs.transition(run.id, RunStatus.SUCCEEDED, allowed={R}, fields={"output": "1"})
    for target in RunStatus:
        with pytest.raises(InvalidTransition):
            await runs.transition(run.id, target, allowed={Q, R})
    assert (await runs.get(run.id)).output == 1


async def test_list_newest_first_with_filters_and_cursor(runs: RunStore) -> None:
    tenant = f"t-{new_run_id()}"
    created = []
    for i in range(7):
        run = await runs.create("a" if i % 2 else "b", i, tenant=tenant)
        created.append(run.id)
        await asyncio.sleep(0.002)  # distinct milliseconds: ids sort by time
    await runs.transition(created[3], R, allowed={Q})

    page, cursor = await runs.list(tenant=tenant, limit=3)
    assert [r.id for r in page] == created[::-1][:3] and cursor
    page2, cursor2 = await runs.list(tenant=tenant, limit=3, cursor=cursor)
    page3, cursor3 = await runs.list(tenant=tenant, limit=3, cursor=cursor2)
    assert [r.id for r in page + page2 + page3] == created[::-1]
    assert cursor3 is None

    only_a, _ = await runs.list(tenant=tenant, workflow="a")
    assert [r.id for r in only_a] == [created[5], created[3], created[1]]
    running, _ = await runs.list(tenant=tenant, status=R)
    assert [r.id for r in running] == [created[3]]
    assert (await runs.list(tenant="nobody"))[0] == []
    with pytest.raises(UserError):
        await runs.list(tenant=tenant, limit=0)


async def test_cancel_queued_is_immediate_running_is_flagged(runs: RunStore) -> None:
    queued = await runs.create("wf", None)
    assert await runs.request_cancel(queued.id, "user") is RunStatus.CANCELLED
    assert (await runs.get(queued.id)).status is RunStatus.CANCELLED

    running = await runs.create("wf", None)
    await runs.transition(running.id, R, allowed={Q})
    signals_before = await runs.redis.xlen(keys.SIGNALS)
    assert await runs.request_cancel(running.id, "user") is R
    assert await runs.cancel_requested(running.id)
    # The run's host hears of it through the signals stream, not by polling.
    signal = (await runs.redis.xrevrange(keys.SIGNALS, count=1))[0][1]
    assert signal == {"run": running.id, "signal": "cancel"}
    assert await runs.redis.xlen(keys.SIGNALS) == signals_before + 1
    with pytest.raises(RunNotFound):
        await runs.request_cancel(new_run_id(), "user")


async def test_creating_an_existing_run_id_changes_nothing(
    runs: RunStore, events: EventStore
) -> None:
    run = await runs.create("wf", {"a": 1})
    await runs.transition(run.id, R, allowed={Q})
    again = await runs.create("wf", {"a": 2}, run_id=run.id, enqueue=True)
    assert again.status is R and again.input == {"a": 1}
    assert [e.event.type for e in await events.read(run.id)] == ["run.queued"]
