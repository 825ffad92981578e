"""Schedules: a workflow started on a cron, in a time zone.

A schedule is a record (``keys.SCHEDULES``), its next due time (``keys.SCHEDULES_DUE``) and an
entry in its tenant's index (``keys.schedule_index``), all three in one slot (a Redis Cluster's):
one script creates a schedule under its tenant's cap, one lists a page with its records and due
times (one round trip a page). The timer service of every supervisor
(:mod:`genx_ray.service._timers`) starts what is due: the run of a tick is created under an
idempotency key naming the schedule and the tick, then the due time is moved to the next tick by
compare-and-set, so however many workers look, and whichever of them dies between the two, each
tick starts exactly one run. A schedule missed while every worker was down starts once when one
returns (for the latest missed tick), not once per missed tick.

What must stay true (docs/security.md):

- A schedule is checked at create: its cron has a next tick, and never ticks more often than
  ``GENX_SCHEDULE_MIN_INTERVAL``; else 422 naming ``cron``. A tenant has at most its
  ``schedules`` limit (``GENX_TENANT_LIMITS``, 100 by default): the index is capped by a script,
  so concurrent creates cannot pass it.
- A schedule that can never tick again is disabled (``disabled`` says why), not retried.
- A tick that starts nothing (quota, overlap) says so in ``last_skipped``.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from datetime import UTC, datetime
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter
from pydantic import BaseModel, JsonValue

from genx_ray.model import DEFAULT_SCHEDULES, InputInvalid, NotFound, QuotaExceeded
from genx_ray.store import _keys as keys
from genx_ray.store import _scripts as lua

# How many ticks ahead the interval check looks: every cron repeats its shortest gap within a
# few ticks (seconds listed in one minute, minutes in one hour...).
_INTERVAL_TICKS = 16
MAX_PAGE = 500


class ScheduleNotFound(NotFound):
    code = "schedule_not_found"

    def __init__(self, schedule_id: str) -> None:
        super().__init__(f"no schedule {schedule_id!r}")
        self.schedule_id = schedule_id


class Skipped(BaseModel):
    """A tick that started no run, and why."""

    at: datetime
    reason: str


class Schedule(BaseModel):
    id: str
    workflow: str
    cron: str
    timezone: str = "UTC"
    input: JsonValue = None
    tenant: str = "default"
    created_at: datetime
    next_run_at: datetime | None = None
    # skip: no new run while the previous run of this schedule is still open; allow: always.
    overlap: Literal["skip", "allow"] = "skip"
    last_run_id: str | None = None
    last_skipped: Skipped | None = None
    disabled: str | None = None  # why the schedule never ticks again
    paused: bool = False  # its ticks pass without starting a run, until it is resumed


def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InputInvalid.field(
            "timezone", f"{timezone!r} is not a time zone (e.g. Europe/Paris)"
        ) from None


def next_tick(cron: str, timezone: str, after: float) -> float | None:
    """The first tick of the schedule after ``after`` (unix seconds); None when there is none
    (a cron naming a year that is past, or a date that never comes)."""
    start = datetime.fromtimestamp(after, _zone(timezone))
    try:
        return float(croniter(cron, start).get_next(float))
    except (CroniterError, ValueError, OverflowError):
        return None


def latest_tick(cron: str, timezone: str, due: float, now: float) -> float:
    """The latest tick due by ``now`` (``due`` itself at least): one run for however many ticks
    were missed, found without walking them one by one."""
    try:
        before = float(croniter(cron, datetime.fromtimestamp(now, _zone(timezone))).get_prev(float))
    except (CroniterError, ValueError, OverflowError):
        before = due
    tick = max(due, before)
    following = next_tick(cron, timezone, tick)
    return following if following is not None and following <= now else tick


def check(
    cron: str, timezone: str, *, min_interval: float = 0, now: float | None = None
) -> ZoneInfo:
    """The schedule's zone, if the cron expression and the zone are valid, the cron has a tick
    to come, and its ticks are at least ``min_interval`` seconds apart; else
    :class:`InputInvalid` naming the field."""
    zone = _zone(timezone)
    if not croniter.is_valid(cron):
        raise InputInvalid.field("cron", f"{cron!r} is not a cron expression (e.g. '*/5 * * * *')")
    at = time.time() if now is None else now
    ticks: list[float] = []
    while len(ticks) < _INTERVAL_TICKS:
        following = next_tick(cron, timezone, ticks[-1] if ticks else at)
        if following is None:
            break
        ticks.append(following)
    if not ticks:
        raise InputInvalid.field("cron", f"{cron!r} never ticks again: it has no next tick")
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    if gaps and min(gaps) < min_interval:
        raise InputInvalid.field(
            "cron",
            f"{cron!r} ticks every {min(gaps):g}s; schedules tick at most every {min_interval:g}s "
            "(GENX_SCHEDULE_MIN_INTERVAL)",
        )
    return zone


class ScheduleStore:
    def __init__(self, client: Any) -> None:
        self.redis = client

    async def create(
        self, workflow: str, cron: str, input: JsonValue, *, timezone: str, tenant: str,
        overlap: Literal["skip", "allow"] = "skip", most: int = DEFAULT_SCHEDULES,
        min_interval: float = 0,
    ) -> Schedule:  # fmt: skip
        """A new schedule; 422 for a cron or zone that does not fit (see :func:`check`),
        :class:`QuotaExceeded` when the tenant has ``most`` schedules already."""
        check(cron, timezone, min_interval=min_interval)
        now = time.time()
        first = next_tick(cron, timezone, now)
        if first is None:  # the check found one a moment ago: a tick that is passing now
            raise InputInvalid.field("cron", f"{cron!r} never ticks again: it has no next tick")
        schedule = Schedule(
            id="sch_" + secrets.token_hex(12), workflow=workflow, cron=cron, timezone=timezone,
            input=input, tenant=tenant, created_at=datetime.fromtimestamp(now, UTC),
            next_run_at=datetime.fromtimestamp(first, UTC), overlap=overlap,
        )  # fmt: skip
        made = await lua.CREATE_SCHEDULE(
            self.redis, [keys.schedule_index(tenant), keys.SCHEDULES, keys.SCHEDULES_DUE],
            [schedule.id, repr(now), most, _record(schedule), repr(first)],
        )  # fmt: skip
        if not made:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {most} schedules, its most (GENX_TENANT_LIMITS "
                "'schedules'); delete one first",
                60.0,
            )
        return schedule

    async def get(self, schedule_id: str, *, tenant: str | None = None) -> Schedule:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(keys.SCHEDULES, schedule_id)
            pipe.zscore(keys.SCHEDULES_DUE, schedule_id)
            raw, due = await pipe.execute()
        if raw is None:
            raise ScheduleNotFound(schedule_id)
        schedule = _parse(raw, due)
        if tenant is not None and schedule.tenant != tenant:
            raise ScheduleNotFound(schedule_id)
        return schedule

    async def page(
        self, *, tenant: str, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[Schedule], str | None]:
        """A page of the tenant's schedules, oldest first, and the cursor of the next page (None
        at the end). One round trip whatever the page size: one script reads the page of the
        index, the records and their due times (every schedule key shares one slot)."""
        limit = max(1, min(limit, MAX_PAGE))
        after_score, after_id = _cursor(cursor)
        reply = cast(
            list[Any],
            await lua.LIST_SCHEDULES(
                self.redis, [keys.schedule_index(tenant), keys.SCHEDULES, keys.SCHEDULES_DUE],
                [after_score, after_id, limit],
            ),
        )  # fmt: skip
        out, last = [], None
        for i in range(0, len(reply) - 1, 4):
            schedule_id, record, due, score = reply[i : i + 4]
            last = f"{score}:{schedule_id}"
            schedule = _parse(record, due)
            if schedule.tenant == tenant:
                out.append(schedule)
        return out, (last if int(reply[-1]) and last is not None else None)

    async def list(self, *, tenant: str) -> list[Schedule]:
        """Every schedule of the tenant (page after page)."""
        out: list[Schedule] = []
        cursor: str | None = None
        while True:
            page, cursor = await self.page(tenant=tenant, limit=MAX_PAGE, cursor=cursor)
            out += page
            if cursor is None:
                return out

    async def set_paused(self, schedule_id: str, paused: bool, *, tenant: str) -> Schedule:
        """Pause a schedule (its ticks pass without a run) or resume it (from its next tick:
        the ticks missed meanwhile start nothing)."""
        schedule = await self.get(schedule_id, tenant=tenant)  # 404 for another tenant's
        schedule.paused = paused
        await self.save(schedule)  # only if it still exists: a delete in between stays a delete
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

    async def save(self, schedule: Schedule) -> bool:
        """Write what the timer service learnt (last run, last skip, disabled), unless the
        schedule was deleted meanwhile."""
        args = [schedule.id, _record(schedule)]
        return bool(await lua.HSET_IF_EXISTS(self.redis, [keys.SCHEDULES], args))

    async def disable(self, schedule: Schedule, reason: str) -> None:
        """The schedule never ticks again: ``disabled`` says why; it stays listed until deleted."""
        schedule.disabled = reason
        await self.save(schedule)
        await self.redis.zrem(keys.SCHEDULES_DUE, schedule.id)

    async def migrate(self) -> int:
        """Move the schedules of an earlier version (due set and tenant indexes outside the
        records' slot) to the keys of this one, once; how many. Cheap when there is nothing to
        move (one EXISTS): every supervisor calls it as it starts."""
        if not await self.redis.exists(keys.OLD_SCHEDULES_DUE):
            return 0
        due = cast(
            list[tuple[str, float]],
            await self.redis.zrange(keys.OLD_SCHEDULES_DUE, 0, -1, withscores=True),
        )
        records = cast(dict[str, str], await self.redis.hgetall(keys.SCHEDULES))
        async with self.redis.pipeline(transaction=False) as pipe:
            if due:
                pipe.zadd(keys.SCHEDULES_DUE, dict(due), nx=True)
            tenants = set()
            for schedule_id, raw in records.items():
                schedule = Schedule.model_validate_json(raw)
                tenants.add(schedule.tenant)
                created = schedule.created_at.timestamp()
                pipe.zadd(keys.schedule_index(schedule.tenant), {schedule_id: created}, nx=True)
            for tenant in tenants:
                pipe.delete(keys.old_schedule_index(tenant))
            pipe.delete(keys.OLD_SCHEDULES_DUE)
            await pipe.execute()
        return len(records)


def _record(schedule: Schedule) -> str:
    return schedule.model_dump_json(exclude={"next_run_at"})


def _parse(raw: str, due: Any) -> Schedule:
    schedule = Schedule.model_validate_json(raw)
    if due is not None:
        schedule.next_run_at = datetime.fromtimestamp(float(due), UTC)
    return schedule


def _cursor(cursor: str | None) -> tuple[str, str]:
    """(creation time, id) of the last schedule of the previous page, as the script takes them;
    a malformed cursor is 422 naming it."""
    if not cursor:
        return "-inf", ""
    score, sep, schedule_id = cursor.partition(":")
    try:
        value = float(score)
    except ValueError:
        value = float("nan")
    if not sep or not schedule_id.startswith("sch_") or not math.isfinite(value):
        raise InputInvalid.field("cursor", "not a cursor this API returned")
    return score, schedule_id
