"""Schedules: a workflow started on a cron, in a time zone.

A schedule is a record (``keys.SCHEDULES``) and its next due time (``keys.SCHEDULES_DUE``). The
timer service of every supervisor (:mod:`genx_ray.service._timers`) starts what is due: the run of a tick
is created under an idempotency key naming the schedule and the tick, then the due time is moved
to the next tick by compare-and-set, so however many workers look, and whichever of them dies
between the two, each tick starts exactly one run. A schedule missed while every worker was down
starts once when one returns (for the latest missed tick), not once per missed tick.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import BaseModel, JsonValue

from genx_ray.model import InputInvalid, NotFound
from genx_ray.store import _keys as keys
from genx_ray.store import _scripts as lua

MAX_PER_TENANT = 1000


class ScheduleNotFound(NotFound):
    code = "schedule_not_found"

    def __init__(self, schedule_id: str) -> None:
        super().__init__(f"no schedule {schedule_id!r}")
        self.schedule_id = schedule_id


class Schedule(BaseModel):
    id: str
    workflow: str
    cron: str
    timezone: str = "UTC"
    input: JsonValue = None
    tenant: str = "default"
    created_at: datetime
    next_run_at: datetime | None = None
    paused: bool = False  # its ticks pass without starting a run, until it is resumed


def check(cron: str, timezone: str) -> ZoneInfo:
    """The schedule's zone, if the cron expression and the zone are valid; else
    :class:`InputInvalid` naming the field."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InputInvalid.field(
            "timezone", f"{timezone!r} is not a time zone (e.g. Europe/Paris)"
        ) from None
    if not croniter.is_valid(cron):
        raise InputInvalid.field("cron", f"{cron!r} is not a cron expression (e.g. '*/5 * * * *')")
    return zone


def next_tick(cron: str, timezone: str, after: float) -> float:
    """The first tick of the schedule after ``after`` (unix seconds)."""
    start = datetime.fromtimestamp(after, check(cron, timezone))
    return float(croniter(cron, start).get_next(float))


class ScheduleStore:
    def __init__(self, client: Any) -> None:
        self.redis = client

    async def create(
        self, workflow: str, cron: str, input: JsonValue, *, timezone: str, tenant: str
    ) -> Schedule:
        check(cron, timezone)
        now = time.time()
        schedule = Schedule(
            id="sch_" + secrets.token_hex(12), workflow=workflow, cron=cron, timezone=timezone,
            input=input, tenant=tenant, created_at=datetime.fromtimestamp(now, UTC),
            next_run_at=datetime.fromtimestamp(next_tick(cron, timezone, now), UTC),
        )  # fmt: skip
        assert schedule.next_run_at is not None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(
                keys.SCHEDULES, schedule.id, schedule.model_dump_json(exclude={"next_run_at"})
            )
            pipe.zadd(keys.schedule_index(tenant), {schedule.id: now})
            pipe.zadd(keys.SCHEDULES_DUE, {schedule.id: schedule.next_run_at.timestamp()})
            await pipe.execute()
        return schedule

    async def get(self, schedule_id: str, *, tenant: str | None = None) -> Schedule:
        raw = await self.redis.hget(keys.SCHEDULES, schedule_id)
        if raw is None:
            raise ScheduleNotFound(schedule_id)
        schedule = Schedule.model_validate_json(raw)
        if tenant is not None and schedule.tenant != tenant:
            raise ScheduleNotFound(schedule_id)
        due = await self.redis.zscore(keys.SCHEDULES_DUE, schedule_id)
        if due is not None:
            schedule.next_run_at = datetime.fromtimestamp(float(due), UTC)
        return schedule

    async def list(self, *, tenant: str) -> list[Schedule]:
        ids = cast(list[str], await self.redis.zrange(keys.schedule_index(tenant), 0, -1))
        out = []
        for schedule_id in ids[:MAX_PER_TENANT]:
            try:
                out.append(await self.get(schedule_id, tenant=tenant))
            except ScheduleNotFound:
                await self.redis.zrem(keys.schedule_index(tenant), schedule_id)
        return out

    async def set_paused(self, schedule_id: str, paused: bool, *, tenant: str) -> Schedule:
        """Pause a schedule (its ticks pass without a run) or resume it (from its next tick:
        the ticks missed meanwhile start nothing)."""
        schedule = await self.get(schedule_id, tenant=tenant)  # 404 for another tenant's
        schedule.paused = paused
        record = schedule.model_dump_json(exclude={"next_run_at"})
        # Only if it still exists: a delete in between stays a delete.
        await lua.SET_IF_PRESENT(self.redis, [keys.SCHEDULES], [schedule_id, record])
        return await self.get(schedule_id, tenant=tenant)

    async def delete(self, schedule_id: str, *, tenant: str) -> None:
        await self.get(schedule_id, tenant=tenant)  # 404 for another tenant's
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(keys.SCHEDULES_DUE, schedule_id)
            pipe.hdel(keys.SCHEDULES, schedule_id)
            pipe.zrem(keys.schedule_index(tenant), schedule_id)
            await pipe.execute()

    async def advance(self, schedule_id: str, seen: float, nxt: float) -> bool:
        """Move the schedule's due time from ``seen`` to ``nxt``, once (compare and set)."""
        args = [schedule_id, repr(seen), repr(nxt)]
        return bool(await lua.ADVANCE_SCHEDULE(self.redis, [keys.SCHEDULES_DUE], args))
