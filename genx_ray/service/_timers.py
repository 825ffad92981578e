"""The timer service: what is due in Redis, done exactly once, whichever supervisor sees it.

Every supervisor runs one, a few times a second (any number of workers: each action is a script
that checks the run first). It looks at ``keys.TIMERS`` (run id -> due time):

- a ``scheduled`` run whose time came is queued;
- a run ``waiting`` in ``genx_ray.sleep`` wakes up (the sleep's end journaled, the run queued);
- a run waiting for input past its deadline is resumed with ``InputTimeout`` journaled;
- a run waiting for a child run checks the child, in case it ended without telling its parent
  (failed by the supervisor, cancelled): its outcome is delivered, or the check is set again;

and at ``keys.SCHEDULES_DUE`` for schedules whose tick came (see :mod:`genx_ray.store._schedules`).
"""

from __future__ import annotations

import logging
import time
from typing import cast

from genx_ray.flow import CHILD_CHECK_SECONDS
from genx_ray.model import GenxError, JournalEntry, RunResumedEvent
from genx_ray.store import RunStore, ScheduleStore, keys, next_tick
from genx_ray.store import scripts as lua

log = logging.getLogger("genx_ray.timers")
BATCH = 500
TICK_SECONDS = 0.25


class Timers:
    def __init__(self, runs: RunStore) -> None:
        self.runs = runs
        self.redis = runs.redis
        self.schedules = ScheduleStore(runs.redis)

    async def tick(self) -> dict[str, int]:
        """One pass over what is due; counts of what was done."""
        counts: dict[str, int] = {}
        now = time.time()
        due = cast(
            list[tuple[str, float]],
            await self.redis.zrangebyscore(
                keys.TIMERS, "-inf", now, start=0, num=BATCH, withscores=True
            ),
        )
        for run_id, score in due:
            done = await self._run_due(str(run_id), now)
            counts[done] = counts.get(done, 0) + 1
            if done != "rearmed":
                await lua.TIMER_DONE(self.redis, [keys.TIMERS], [run_id, repr(score)])
        ticks = cast(
            list[tuple[str, float]],
            await self.redis.zrangebyscore(
                keys.SCHEDULES_DUE, "-inf", now, start=0, num=BATCH, withscores=True
            ),
        )
        for schedule_id, score in ticks:
            started = await self._schedule_due(str(schedule_id), float(score), now)
            counts[started] = counts.get(started, 0) + 1
        return counts

    async def _run_due(self, run_id: str, now: float) -> str:
        h = cast(dict[str, str], await self.redis.hgetall(keys.run(run_id)))
        status, kind, step = h.get("status"), h.get("wait_kind"), h.get("wait_step", "")
        if status == "scheduled":
            return "started" if await self.runs.start_scheduled(run_id) else "gone"
        if status != "waiting":
            return "gone"
        attempt = int(h.get("attempt", "0"))
        if kind == "sleep" and float(h.get("wait_until") or 0) <= now:
            entry = JournalEntry("sleep", "", value=float(h["wait_until"])).dumps()
            resumed = RunResumedEvent(run_id=run_id, attempt=attempt, reason="woke up")
            return "woke" if await self.runs.resume(run_id, step, entry, [resumed]) else "raced"
        if kind == "input" and h.get("wait_deadline") and float(h["wait_deadline"]) <= now:
            error = {"type": "InputTimeout", "message": "no input by the deadline",
                     "deadline": float(h["wait_deadline"])}  # fmt: skip
            entry = JournalEntry("wait_for_input", h.get("wait_hash", ""), error=error).dumps()
            resumed = RunResumedEvent(run_id=run_id, attempt=attempt, reason="input timed out")
            return (
                "timed out" if await self.runs.resume(run_id, step, entry, [resumed]) else "raced"
            )
        if kind == "child" and h.get("wait_child"):
            from genx_ray.engine import tell_parent

            child = h["wait_child"]
            if (await self.runs.status(child)).terminal:
                await tell_parent(self.runs, child, run_id, step)
                return "child ended"
            await self.redis.zadd(keys.TIMERS, {run_id: now + CHILD_CHECK_SECONDS})
            return "rearmed"
        return "not yet"

    async def _schedule_due(self, schedule_id: str, due: float, now: float) -> str:
        try:
            schedule = await self.schedules.get(schedule_id)
        except GenxError:
            await self.redis.zrem(keys.SCHEDULES_DUE, schedule_id)
            return "gone"
        # The latest tick due (once, however many were missed), under a key naming it: however
        # many supervisors get here, one run.
        tick = due
        while (following := next_tick(schedule.cron, schedule.timezone, tick)) <= now:
            tick = following
        try:
            if not schedule.paused:  # a paused schedule's ticks pass without a run
                await self.runs.create_idempotent(
                    schedule.workflow, schedule.input, tenant=schedule.tenant,
                    key=f"schedule:{schedule_id}:{int(tick)}", extra={"schedule_id": schedule_id},
                )  # fmt: skip
        except GenxError as exc:
            log.warning("schedule %s: its run did not start (%s)", schedule_id, exc)
        nxt = next_tick(schedule.cron, schedule.timezone, max(now, tick))
        return "ticked" if await self.schedules.advance(schedule_id, due, nxt) else "raced"
