"""One tenant's schedule never stops the fleet (issue #23, points 1 and 2): a schedule with no
tick to come is disabled with its reason while every other duty and schedule goes on; a tick is
admitted through its tenant's quota like a POST, skips while its previous run is open, and says
why it started nothing; a tenant's schedules are capped and listed a page at a time."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from genx_ray.model import QuotaExceeded, RunStatus, Settings, TenantLimit
from genx_ray.observe import exposition
from genx_ray.service import Supervisor
from genx_ray.service._timers import Timers
from genx_ray.store import Quotas, RunStore, Schedule, ScheduleStore, keys

SETTINGS = Settings(lease_seconds=1, max_attempts=3)


def _tenant() -> str:
    return f"t{secrets.token_hex(4)}"


async def _poisoned(redis: Any, tenant: str) -> str:
    """A schedule whose only tick has passed (created when it was still to come: a 7-field cron
    naming a year), due now: after its tick, it has no next one."""
    schedule = Schedule(
        id="sch_" + secrets.token_hex(12), workflow="echo", cron="0 0 1 1 * 0 2020",
        input={"text": "poison"}, tenant=tenant, created_at=datetime.now(UTC),
    )  # fmt: skip
    await redis.hset(keys.SCHEDULES, schedule.id, schedule.model_dump_json())
    await redis.zadd(keys.schedule_index(tenant), {schedule.id: time.time()})
    await redis.zadd(keys.SCHEDULES_DUE, {schedule.id: time.time() - 5})
    return schedule.id


async def _due_now(
    redis: Any, store: ScheduleStore, tenant: str, cron: str = "* * * * *", **kw: Any
) -> str:
    schedule = await store.create("echo", cron, {"text": tenant}, timezone="UTC", tenant=tenant,
                                  **kw)  # fmt: skip
    await redis.zadd(keys.SCHEDULES_DUE, {schedule.id: time.time() - 1})
    return schedule.id


async def test_a_schedule_with_no_next_tick_is_disabled_and_the_others_tick(
    redis: Any, runs: RunStore
) -> None:
    store = ScheduleStore(redis)
    victim, attacker = _tenant(), _tenant()
    poison = await _poisoned(redis, attacker)
    other = await _due_now(redis, store, victim)
    counts = await Timers(runs).tick()  # today: the exception escapes, every tick, forever
    assert counts.get("ticked", 0) >= 1
    disabled = await store.get(poison, tenant=attacker)
    assert disabled.disabled is not None and "no tick after" in disabled.disabled
    assert await redis.zscore(keys.SCHEDULES_DUE, poison) is None  # not tried every 250 ms
    started, _ = await runs.list(tenant=victim)
    assert [r.schedule_id for r in started] == [other]
    assert (await store.get(other, tenant=victim)).next_run_at.timestamp() > time.time()  # type: ignore[union-attr]
    await store.delete(other, tenant=victim)


async def test_a_schedule_whose_zone_is_gone_is_disabled_with_the_reason(
    redis: Any, runs: RunStore
) -> None:
    tenant = _tenant()
    schedule = Schedule(
        id="sch_" + secrets.token_hex(12), workflow="echo", cron="* * * * *", input=None,
        timezone="Atlantis/Capital", tenant=tenant, created_at=datetime.now(UTC),
    )  # fmt: skip
    await redis.hset(keys.SCHEDULES, schedule.id, schedule.model_dump_json())
    await redis.zadd(keys.SCHEDULES_DUE, {schedule.id: time.time() - 1})
    assert await Timers(runs).tick() == {"disabled": 1}
    store = ScheduleStore(redis)
    disabled = (await store.get(schedule.id)).disabled
    assert disabled is not None and "Atlantis/Capital" in disabled
    await store.delete(schedule.id, tenant=tenant)


async def test_a_schedule_whose_record_is_broken_is_set_aside_not_in_the_way(
    redis: Any, runs: RunStore
) -> None:
    store = ScheduleStore(redis)
    victim = _tenant()
    broken = "sch_" + secrets.token_hex(12)
    await redis.hset(keys.SCHEDULES, broken, "{not json")
    await redis.zadd(keys.SCHEDULES_DUE, {broken: time.time() - 10})
    other = await _due_now(redis, store, victim)
    counts = await Timers(runs).tick()
    assert counts.get("quarantined") == 1 and counts.get("ticked", 0) >= 1
    later = await redis.zscore(keys.SCHEDULES_DUE, broken)
    assert later is not None and later > time.time() + 30  # set aside, not retried each tick
    started, _ = await runs.list(tenant=victim)
    assert len(started) == 1
    await redis.zrem(keys.SCHEDULES_DUE, broken)
    await redis.hdel(keys.SCHEDULES, broken)
    await store.delete(other, tenant=victim)


async def _orphan(runs: RunStore, redis: Any) -> str:
    """A run left 'running' by a host that died: no lease, an old heartbeat."""
    run = await runs.create("wf", None)
    await runs.transition(run.id, RunStatus.RUNNING, allowed={RunStatus.QUEUED},
                          fields={"attempt": "1"})  # fmt: skip
    await redis.zadd(keys.LEASES, {run.id: time.time() - 60})
    return run.id


async def test_a_failing_duty_delays_no_other_duty(redis: Any, runs: RunStore) -> None:
    """The timers fail every tick (a poisoned schedule, and the timers set itself unreadable):
    the lease sweep still restarts a run whose host died."""
    attacker = _tenant()
    poison = await _poisoned(redis, attacker)
    run_id = await _orphan(runs, redis)
    supervisor = Supervisor(redis, SETTINGS)
    saved = await redis.zrange(keys.TIMERS, 0, -1, withscores=True)
    await redis.delete(keys.TIMERS)
    await redis.set(keys.TIMERS, "not a sorted set")  # WRONGTYPE for every read of it
    stop = asyncio.Event()
    task = asyncio.create_task(supervisor.serve(stop))
    try:
        deadline = time.monotonic() + 10
        while (await runs.get(run_id)).status is RunStatus.RUNNING:
            assert time.monotonic() < deadline, "the lease sweep never ran"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        await redis.delete(keys.TIMERS)
        if saved:
            await redis.zadd(keys.TIMERS, dict(saved))
    assert (await runs.get(run_id)).attempt == 2
    assert "timers" in supervisor._failing  # it did fail, and was logged once
    await redis.zrem(keys.SCHEDULES_DUE, poison)


async def test_schedule_ticks_pay_their_quota_and_say_when_they_start_nothing(
    redis: Any, runs: RunStore
) -> None:
    tenant = _tenant()
    quotas = Quotas(redis, {tenant: TenantLimit(running=1)})
    timers = Timers(runs, quotas)
    store = ScheduleStore(redis)
    blocker = await runs.create("echo", {"text": "held"}, tenant=tenant)  # never taken: open
    await quotas.opened(tenant, blocker.id)
    schedule_id = await _due_now(redis, store, tenant, overlap="allow")
    counts = await timers.tick()
    assert counts == {"skipped (quota)": 1}
    skipped = await store.get(schedule_id, tenant=tenant)
    assert skipped.last_skipped is not None and "runs in progress" in skipped.last_skipped.reason
    assert skipped.next_run_at is not None and skipped.next_run_at.timestamp() > time.time()
    started, _ = await runs.list(tenant=tenant)
    assert [r.id for r in started] == [blocker.id]  # the tick started nothing
    assert b'genx_schedule_ticks_skipped_total{reason="quota"}' in exposition({})
    # Room again: the next tick starts its run, counted against the quota.
    await runs.request_cancel(blocker.id)
    await redis.zadd(keys.SCHEDULES_DUE, {schedule_id: time.time() - 1})
    await redis.delete(keys.quota(tenant).pruning)
    assert await timers.tick() == {"ticked": 1}
    with pytest.raises(QuotaExceeded):
        await quotas.admit(tenant)  # the schedule's run holds the tenant's one slot
    await store.delete(schedule_id, tenant=tenant)


async def test_overlap_skip_starts_no_run_while_the_previous_one_is_open(
    redis: Any, runs: RunStore
) -> None:
    tenant = _tenant()
    timers, store = Timers(runs), ScheduleStore(redis)
    # Every second, overlap: skip (the default); each tick below is the next second's.
    schedule_id = await _due_now(redis, store, tenant, "* * * * * *")
    assert await timers.tick() == {"ticked": 1}
    first = (await store.get(schedule_id, tenant=tenant)).last_run_id
    assert first is not None and (await runs.get(first)).status is RunStatus.QUEUED
    await _next_second()
    assert await timers.tick() == {"skipped (overlap)": 1}
    skipped = (await store.get(schedule_id, tenant=tenant)).last_skipped
    assert skipped is not None and first in skipped.reason
    await runs.request_cancel(first)
    await _next_second()
    assert await timers.tick() == {"ticked": 1}
    assert (await store.get(schedule_id, tenant=tenant)).last_run_id != first
    await store.delete(schedule_id, tenant=tenant)


async def test_a_tenant_has_at_most_its_schedules_and_lists_them_a_page_at_a_time(
    redis: Any,
) -> None:
    tenant, store = _tenant(), ScheduleStore(redis)
    made = [
        (await store.create("echo", "0 9 * * *", None, timezone="UTC", tenant=tenant, most=7)).id
        for _ in range(7)
    ]
    with pytest.raises(QuotaExceeded, match="7 schedules"):
        await store.create("echo", "0 9 * * *", None, timezone="UTC", tenant=tenant, most=7)
    pages, cursor, calls = [], None, []
    while True:
        before = await _calls(redis)
        page, cursor = await store.page(tenant=tenant, limit=3, cursor=cursor)
        after = await _calls(redis)
        calls.append({c: n - before.get(c, 0) for c, n in after.items() if n != before.get(c, 0)})
        pages.append([s.id for s in page])
        if cursor is None:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == made  # oldest first, each once
    for made_calls in calls:  # one script call a page (its own reads inside), then our INFO
        inside = ("zrangebyscore", "hget", "zscore", "zrem", "info")
        sent = {c for c in made_calls if c not in inside and c != "script|load"}  # its 1st use
        assert sent == {"evalsha"} and made_calls["evalsha"] <= 2, made_calls  # 2: a NOSCRIPT
    for schedule_id in made:
        await store.delete(schedule_id, tenant=tenant)


async def _next_second() -> None:
    """Until the clock is in the next second (a schedule ticking every second has a new tick)."""
    await asyncio.sleep(int(time.time()) + 1.01 - time.time())


async def _calls(redis: Any) -> dict[str, int]:
    """Calls so far, by command (a script's own commands counted under theirs)."""
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def _commands(redis: Any) -> int:
    return int((await redis.info("stats"))["total_commands_processed"])


def test_every_schedule_record_of_before_still_reads() -> None:
    old = {"id": "sch_1", "workflow": "echo", "cron": "* * * * *", "timezone": "UTC",
           "input": None, "tenant": "a", "created_at": "2025-01-01T00:00:00Z"}  # fmt: skip
    schedule = Schedule.model_validate_json(json.dumps(old))
    assert schedule.overlap == "skip" and schedule.disabled is None


async def test_quota_admission_costs_the_same_few_commands_whatever_the_open_runs(
    redis: Any, runs: RunStore
) -> None:
    """A tenant at its cap of open runs (here held by runs scheduled a year ahead): each refused
    request costs a handful of commands, not one per open run (today N+1)."""
    costs = {}
    for n in (10, 600):
        tenant = _tenant()
        quotas = Quotas(redis, {tenant: TenantLimit(running=n)})
        for _ in range(n):
            run = await runs.create("echo", None, tenant=tenant, start_at=time.time() + 3e7)
            await quotas.opened(tenant, run.id)
        spent = []
        for _ in range(5):
            before = await _commands(redis)
            with pytest.raises(QuotaExceeded):
                await quotas.admit(tenant)
            spent.append(await _commands(redis) - before - 1)  # the INFO itself
        costs[n] = spent
    # The first refusal prunes a batch (at most PRUNE_BATCH reads, one round trip); then the
    # script (and the ZCARD in it) and one EXISTS.
    assert costs[600][0] <= 64 + 10 and costs[600][1:] == costs[10][1:] == [3, 3, 3, 3], costs


async def test_schedules_of_the_earlier_key_layout_move_once(redis: Any, runs: RunStore) -> None:
    """A due set and tenant indexes of the earlier layout (outside the records' slot) are moved
    by the first supervisor that starts: the schedules tick and list as before."""
    tenant = _tenant()
    schedule = Schedule(
        id="sch_" + secrets.token_hex(12), workflow="echo", cron="0 9 * * *", input=None,
        tenant=tenant, created_at=datetime.now(UTC),
    )  # fmt: skip
    due = time.time() + 3600
    await redis.hset(keys.SCHEDULES, schedule.id, schedule.model_dump_json())
    await redis.zadd(keys.OLD_SCHEDULES_DUE, {schedule.id: due})
    await redis.zadd(keys.old_schedule_index(tenant), {schedule.id: time.time()})
    store = ScheduleStore(redis)
    assert await store.migrate() >= 1
    assert await store.migrate() == 0  # once
    assert await redis.zscore(keys.SCHEDULES_DUE, schedule.id) == pytest.approx(due)
    assert [s.id for s in (await store.page(tenant=tenant))[0]] == [schedule.id]
    assert not await redis.exists(keys.OLD_SCHEDULES_DUE, keys.old_schedule_index(tenant))
    await store.delete(schedule.id, tenant=tenant)
