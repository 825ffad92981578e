"""The timer service: what is due in Redis, done exactly once, whichever supervisor sees it.

Every supervisor runs one, a few times a second (any number of workers: each action is a script
that checks the run first). It looks at ``keys.TIMERS`` (run id -> due time):

- a ``scheduled`` run whose time came is queued;
- a run ``waiting`` in ``genx_ray.sleep`` wakes up (the sleep's end journaled, the run queued);
- a run waiting for input past its deadline is resumed with ``InputTimeout`` journaled;
- a run waiting on its ``map(llm="batch")``'s batches is resumed to look at them (it parks
  again while they run); one cancelled meanwhile has its open batches cancelled;
- a run waiting for a child run checks the child, in case it ended without telling its parent
  (failed by the supervisor, cancelled): its outcome is delivered, or the check is set again;

and at ``keys.SCHEDULES_DUE`` for schedules whose tick came (see :mod:`genx_ray.store._schedules`):
each tick's run is admitted through :class:`~genx_ray.store.Quotas` like a POST; a tick over
quota, or one whose previous run is still open (``overlap: skip``), starts nothing and says so.

What must stay true: one item's failure (a run's timer, a schedule) is that item's alone. It is
logged once and set aside for ``QUARANTINE_SECONDS`` (its due time moved on), and every other
item of the pass goes on; a schedule with no tick to come is disabled, with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import cast

from genx_ray.flow import CHILD_CHECK_SECONDS, cancel_batches
from genx_ray.model import (
    TERMINAL,
    GenxError,
    InputInvalid,
    JournalEntry,
    QuotaExceeded,
    RunResumedEvent,
)
from genx_ray.observe import observer
from genx_ray.store import (
    Quotas,
    RunStore,
    Schedule,
    ScheduleNotFound,
    ScheduleStore,
    Skipped,
    keys,
    latest_tick,
    next_tick,
)
from genx_ray.store import scripts as lua

log = logging.getLogger("genx_ray.timers")
BATCH = 500
TICK_SECONDS = 0.25
QUARANTINE_SECONDS = 60.0  # how long an item that failed is set aside before it is tried again


class Timers:
    def __init__(self, runs: RunStore, quotas: Quotas | None = None) -> None:
        self.runs = runs
        self.redis = runs.redis
        self.schedules = ScheduleStore(runs.redis)
        self.quotas = quotas or Quotas(runs.redis, {})
        # Items whose last failure was logged: one line per item's trouble, not one per tick.
        self._failing: set[str] = set()

    async def tick(self) -> dict[str, int]:
        """One pass over what is due; counts of what was done. An item that fails is contained:
        logged once, set aside (``QUARANTINE_SECONDS``), and the others go on."""
        counts: dict[str, int] = {}
        now = time.time()
        due = cast(
            list[tuple[str, float]],
            await self.redis.zrangebyscore(
                keys.TIMERS, "-inf", now, start=0, num=BATCH, withscores=True
            ),
        )
        for run_id, score in due:
            try:
                done = await self._run_due(str(run_id), now)
                if done != "rearmed":
                    await lua.TIMER_DONE(self.redis, [keys.TIMERS], [run_id, repr(score)])
                self._recovered(f"timer {run_id}")
            except Exception as exc:  # one run's trouble is not the others'
                done = "quarantined"
                await self._quarantine(keys.TIMERS, f"timer {run_id}", str(run_id), score, exc)
            counts[done] = counts.get(done, 0) + 1
        ticks = cast(
            list[tuple[str, float]],
            await self.redis.zrangebyscore(
                keys.SCHEDULES_DUE, "-inf", now, start=0, num=BATCH, withscores=True
            ),
        )
        for schedule_id, score in ticks:
            try:
                started = await self._schedule_due(str(schedule_id), float(score), now)
                self._recovered(f"schedule {schedule_id}")
            except Exception as exc:  # one schedule's trouble is not the others'
                started = "quarantined"
                what = f"schedule {schedule_id}"
                await self._quarantine(keys.SCHEDULES_DUE, what, str(schedule_id), score, exc)
            counts[started] = counts.get(started, 0) + 1
        return counts

    async def _quarantine(
        self, key: str, what: str, member: str, seen: float, exc: Exception
    ) -> None:
        """Set a failing item aside for a while (its due time moved on, by compare-and-set), so
        it is neither retried every tick nor in the way of the items after it."""
        if what not in self._failing:
            self._failing.add(what)
            log.warning("%s failed (%s: %s); set aside for %ss", what, type(exc).__name__, exc,
                        QUARANTINE_SECONDS)  # fmt: skip
        with contextlib.suppress(Exception):  # Redis itself away: the next tick tries again
            later = repr(time.time() + QUARANTINE_SECONDS)
            await lua.ADVANCE_SCHEDULE(self.redis, [key], [member, repr(seen), later])

    def _recovered(self, what: str) -> None:
        if self._failing and what in self._failing:
            self._failing.discard(what)
            log.warning("%s: working again", what)

    async def _run_due(self, run_id: str, now: float) -> str:
        h = cast(dict[str, str], await self.redis.hgetall(keys.run(run_id)))
        status, kind, step = h.get("status"), h.get("wait_kind"), h.get("wait_step", "")
        if status == "scheduled":
            return "started" if await self.runs.start_scheduled(run_id) else "gone"
        if status == "cancelled" and await self.redis.exists(keys.batches(run_id)):
            # a run cancelled while its map(llm="batch") waited: its batches are cancelled too
            await cancel_batches(self.redis, run_id)
            return "gone"
        if status != "waiting":
            return "gone"
        attempt = int(h.get("attempt", "0"))
        if kind == "sleep" and float(h.get("wait_until") or 0) <= now:
            entry = JournalEntry("sleep", "", value=float(h["wait_until"])).dumps()
            resumed = RunResumedEvent(run_id=run_id, attempt=attempt, reason="woke up")
            return "woke" if await self.runs.resume(run_id, step, entry, [resumed]) else "raced"
        if kind == "batch" and float(h.get("wait_until") or 0) <= now:
            # the map looks at its batches (and parks again while they run)
            resumed = RunResumedEvent(run_id=run_id, attempt=attempt, reason="batch poll")
            return "polled" if await self.runs.resume(run_id, step, "", [resumed]) else "raced"
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
        except ScheduleNotFound:
            await self.redis.zrem(keys.SCHEDULES_DUE, schedule_id)
            return "gone"
        if schedule.disabled:
            await self.redis.zrem(keys.SCHEDULES_DUE, schedule_id)
            return "disabled"
        # The latest tick due (once, however many were missed), under a key naming it: however
        # many supervisors get here, one run.
        try:
            tick = latest_tick(schedule.cron, schedule.timezone, due, now)
        except InputInvalid as exc:  # a record no create would accept (an unknown zone now)
            await self.schedules.disable(schedule, f"it cannot tick: {exc.message}")
            log.warning("schedule %s disabled: %s", schedule_id, exc.message)
            return "disabled"
        outcome, skipped = (
            ("paused", None) if schedule.paused else await self._start(schedule, tick)
        )  # a paused schedule's ticks pass without a run
        nxt = next_tick(schedule.cron, schedule.timezone, max(now, tick))
        if nxt is None:
            when = datetime.fromtimestamp(tick, UTC).isoformat()
            reason = f"its cron {schedule.cron!r} has no tick after {when}"
            await self.schedules.disable(schedule, reason)
            log.warning("schedule %s disabled: %s", schedule_id, reason)
        elif not await self.schedules.advance(schedule_id, due, nxt):
            return "raced"  # another timer service dealt with this tick (and told any skip)
        if skipped is not None:
            await self._skip(schedule, tick, outcome, skipped)
            return f"skipped ({outcome})"
        return outcome

    async def _start(self, schedule: Schedule, tick: float) -> tuple[str, str | None]:
        """The run of one tick, admitted like a POST: ("ticked", None); or why it starts
        nothing: ("quota" | "overlap", the reason)."""
        previous = schedule.last_run_id
        key = f"schedule:{schedule.id}:{int(tick)}"
        # This tick's run made already (another supervisor got here first): no skip to tell.
        made = await self.redis.exists(keys.idempotency(schedule.tenant, schedule.workflow, key))
        if schedule.overlap == "skip" and previous is not None and not made:
            status = await self.redis.hget(keys.run(previous), "status")
            if status is not None and status not in TERMINAL:
                return "overlap", f"its previous run {previous} is still {status}"
        try:
            run, replayed = await self.runs.create_idempotent(
                schedule.workflow, schedule.input, tenant=schedule.tenant, key=key,
                extra={"schedule_id": schedule.id}, quotas=self.quotas,
            )  # fmt: skip
        except QuotaExceeded as exc:
            return "quota", exc.message
        except GenxError as exc:
            log.warning("schedule %s: its run did not start (%s)", schedule.id, exc)
            return "failed", None
        if not replayed and schedule.last_run_id != run.id:
            schedule.last_run_id = run.id
            await self.schedules.save(schedule)
        return ("raced" if replayed else "ticked"), None

    async def _skip(self, schedule: Schedule, tick: float, kind: str, why: str) -> None:
        """Tell a tick that started no run: a log line, ``genx_schedule_ticks_skipped``, and
        ``last_skipped`` on the schedule."""
        at = datetime.fromtimestamp(tick, UTC)
        log.warning("schedule %s: the tick of %s started no run: %s", schedule.id,
                    at.isoformat(), why)  # fmt: skip
        observer().schedule_skipped(kind)
        schedule.last_skipped = Skipped(at=at, reason=why)
        await self.schedules.save(schedule)
