"""Finding runs whose host is gone, and restarting them from their journal.

Every worker runs one; any number may run at once. Two ways to notice a lost run:

- **Known deaths, fast.** A worker whose runs share its fate (its hosts are inline, or on a local
  Ray it started, which dies with it) heartbeats its entry in the worker table twice a second
  from a thread. Once it has been silent for ``WORKER_DEAD_SECONDS``, its running runs are
  restarted at once, without waiting for their leases. (A host Ray reports dead is handled by
  the worker that placed the run, the same way: :mod:`genx_ray.service._worker`.)
- **Silent losses, by lease.** A run is orphaned when it is ``running`` and its lease key expired
  (a frozen process, a partitioned machine, a dead cluster node): the stale end of the leases set
  says which runs to check.

Either way :meth:`genx_ray.store._runs.RunStore.reap` re-checks the run's attempt atomically, then
requeues it as ``attempt + 1`` with a ``run.restarted`` event, or, past the attempt cap (or for
a run started from a script, whose code workers may lack), fails it with the reason. Two
supervisors racing for one run: the second finds the attempt moved. The supervisor also trims the
run indexes of runs past their retention, and runs the timer service
(:mod:`genx_ray.service._timers`: scheduled runs, sleeps, input deadlines, schedules).

What must stay true: each duty (timers, worker sweep, lease sweep, trimming) runs on its own. An
error in one is logged once per outage and never delays or skips another; within a duty, an
error on one run is that run's alone (logged, the run looked at again a lease later).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from genx_ray.model import Settings, new_run_id
from genx_ray.service._timers import TICK_SECONDS, Timers
from genx_ray.store import (
    ConcurrencyKeys,
    Quotas,
    RunQueue,
    RunStore,
    backfill_status_indexes,
    keys,
    notify,
    worker_alive,
)

log = logging.getLogger("genx_ray.supervisor")

WORKER_BEAT_SECONDS = 0.5  # how often a worker writes its entry in the worker table
TRIM_EVERY_SECONDS = 60.0
OLD_QUEUE_EVERY_SECONDS = 5.0  # runs an older version queued on the stream, moved to the queue


class Supervisor:
    def __init__(self, client: Any, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.runs = RunStore(
            client, maxlen=settings.stream_maxlen, retention_seconds=settings.retention_seconds
        )
        self._trimmed_at = 0.0
        self._old_queue_at = 0.0
        # Set by a worker: the keys whose waiting runs this supervisor lets go as places free.
        self.concurrency: ConcurrencyKeys | None = None
        self.timers = Timers(self.runs, Quotas(client, settings.tenant_limits))
        self._failing: set[str] = set()  # duties whose failure was logged (one line per outage)

    async def sweep(self) -> dict[str, int]:
        """One pass over runs whose last renewal is older than the lease; returns counts."""
        counts: dict[str, int] = {}
        cutoff = time.time() - self.settings.lease_seconds
        stale = cast(
            list[str],
            await self.redis.zrangebyscore(keys.LEASES, "-inf", cutoff, start=0, num=500),
        )
        for run_id in stale:
            outcome = await self._contained(run_id)
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    async def _contained(self, run_id: str, dead_worker: str | None = None) -> str:
        """:meth:`_check`, its failure this run's alone: logged once, the run looked at again a
        lease later (its place at the stale end given up), the others checked meanwhile."""
        try:
            outcome = await self._check(run_id, dead_worker=dead_worker)
        except Exception as exc:  # one run's trouble is not the others'
            what = f"run {run_id}"
            if what not in self._failing:
                self._failing.add(what)
                log.warning("supervisor: checking %s failed (%s: %s); again in %ss", what,
                            type(exc).__name__, exc, self.settings.lease_seconds)  # fmt: skip
            with contextlib.suppress(Exception):
                await self.redis.zadd(keys.LEASES, {run_id: time.time()}, xx=True)
            return "error"
        self._failing.discard(f"run {run_id}")
        return outcome

    async def _check(self, run_id: str, *, dead_worker: str | None = None) -> str:
        attempt, origin, lost = await self.redis.hmget(
            keys.run(run_id), "attempt", "origin", "lost"
        )
        if attempt is None:
            await self.redis.zrem(keys.LEASES, run_id)
            return "gone"
        n, cap = int(attempt), self.settings.max_attempts
        losses = int(lost or 0) + 1  # this one included
        if dead_worker is not None:
            reason = f"its worker {dead_worker} died, and its run host with it"
        else:
            reason = (
                f"the run host of attempt {n} stopped heartbeating (no lease renewal in "
                f"{self.settings.lease_seconds}s)"
            )
        if origin == "local":
            reason = (
                f"the process that started it with genx_ray.start() stopped ({reason}); a run "
                "started from a script is not restarted elsewhere"
            )
        else:
            reason = f"{reason}; {losses} of {cap} attempts used"
        outcome = await self.runs.reap(
            run_id, n, max_attempts=cap, reason=reason, host_dead=dead_worker is not None
        )
        if outcome == "requeued":
            log.warning("run %s: %s; requeued as attempt %d", run_id, reason, n + 1)
        elif outcome == "failed":
            log.warning("run %s: %s; failed", run_id, reason)
            await notify(self.redis, self.settings, run_id)
        return outcome

    async def sweep_workers(self) -> dict[str, int]:
        """Restart the runs of workers that died with their runs; returns counts."""
        counts: dict[str, int] = {}
        table = await self.redis.hgetall(keys.WORKERS)
        now = time.time()
        dead = []
        for name, raw in table.items():
            try:
                entry = json.loads(raw)
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
            except ValueError:  # not a worker's entry: dropped, it names no run
                log.warning("supervisor: the worker table's entry %r is malformed; dropped", name)
                await self.redis.hdel(keys.WORKERS, name)
                continue
            if not worker_alive(entry, now) and entry.get("fate") == "shared":
                dead.append(str(name))
        if not dead:
            return counts
        watched = cast(list[str], await self.redis.zrange(keys.LEASES, 0, -1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in watched:
                pipe.hmget(keys.run(run_id), "worker", "status")
            owners = await pipe.execute()
        for run_id, (worker, status) in zip(watched, owners, strict=True):
            if worker in dead and status == "running":
                outcome = await self._contained(run_id, dead_worker=worker)
                counts[outcome] = counts.get(outcome, 0) + 1
        # Its entry stays while it holds queue entries it had not started: the entry is how the
        # other workers know it is dead, and take those over (genx_ray.store._queue).
        gone = set(dead) - await RunQueue(self.redis).holding(dead)
        if gone:
            await self.redis.hdel(keys.WORKERS, *gone)
        return counts

    async def trim_indexes(self, batch: int = 500) -> int:
        """Drop runs past their retention from every tenant's run index; returns how many.

        Each index is walked from its oldest id (ids sort by creation time, and runs expire
        roughly in that order) until a batch holds no expired run: the work stays proportional
        to what expired, not to the length of the index.
        """
        removed = 0
        for index in cast(list[str], await self.redis.zrange(keys.INDEXES, 0, -1)):
            lower = "-"
            while True:
                run_ids = cast(
                    list[str], await self.redis.zrangebylex(index, lower, "+", start=0, num=batch)
                )
                if not run_ids:
                    break
                async with self.redis.pipeline(transaction=False) as pipe:
                    for run_id in run_ids:
                        pipe.exists(keys.run(run_id))
                    exists = await pipe.execute()
                # A run younger than a minute may be indexed a moment before it exists.
                young = new_run_id(time.time() - 60)
                gone = [r for r, e in zip(run_ids, exists, strict=True) if not e and r < young]
                if gone:
                    removed += int(await self.redis.zrem(index, *gone))
                if not gone or len(run_ids) < batch:
                    break
                lower = f"({run_ids[-1]}"
        return removed

    async def serve(self, stop: asyncio.Event) -> None:
        """Every duty, a few times a second, each on its own: one that fails (Redis trouble, a
        bug, bad data) is logged once per outage and never delays or skips another."""
        lease_every = max(0.2, self.settings.lease_seconds / 3)
        next_lease_sweep = 0.0
        await self._duty("schedule keys migration", self.timers.schedules.migrate)
        while not stop.is_set():
            now = time.monotonic()
            await self._duty("timers", self.timers.tick)
            await self._duty("worker sweep", self.sweep_workers)
            if self.concurrency is not None:  # a worker's (runs it takes may have keys)
                await self._duty("concurrency keys", self.concurrency.release)
            if now >= self._old_queue_at + OLD_QUEUE_EVERY_SECONDS:
                self._old_queue_at = now
                await self._duty("old run queue", RunQueue(self.redis).move_old_queue)
            if now >= next_lease_sweep:
                await self._duty("lease sweep", self.sweep)
                next_lease_sweep = now + lease_every
            if now - self._trimmed_at >= TRIM_EVERY_SECONDS:
                self._trimmed_at = now
                await self._duty("index trimming", self.trim_indexes)
                # Once per Redis: runs indexed before the status indexes existed.
                await self._duty("status indexes", lambda: backfill_status_indexes(self.redis))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_SECONDS)

    async def _duty(self, name: str, duty: Callable[[], Awaitable[object]]) -> None:
        try:
            await duty()
        except Exception as exc:  # a duty's failure is its own, never the others'
            if name not in self._failing:
                log.warning("supervisor: %s failed (%s: %s); retrying", name,
                            type(exc).__name__, exc)  # fmt: skip
            self._failing.add(name)
            return
        if name in self._failing:
            self._failing.discard(name)
            log.warning("supervisor: %s working again", name)
