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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, cast

from genx_ray.model import Settings, new_run_id
from genx_ray.service._timers import TICK_SECONDS, Timers
from genx_ray.store import RunStore, backfill_status_indexes, keys, notify, worker_alive

log = logging.getLogger("genx_ray.supervisor")

WORKER_BEAT_SECONDS = 0.5  # how often a worker writes its entry in the worker table
TRIM_EVERY_SECONDS = 60.0


class Supervisor:
    def __init__(self, client: Any, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.runs = RunStore(
            client, maxlen=settings.stream_maxlen, retention_seconds=settings.retention_seconds
        )
        self._trimmed_at = 0.0
        self.timers = Timers(self.runs)

    async def sweep(self) -> dict[str, int]:
        """One pass over runs whose last renewal is older than the lease; returns counts."""
        counts: dict[str, int] = {}
        cutoff = time.time() - self.settings.lease_seconds
        stale = cast(
            list[str],
            await self.redis.zrangebyscore(keys.LEASES, "-inf", cutoff, start=0, num=500),
        )
        for run_id in stale:
            outcome = await self._check(run_id)
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

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
            entry = json.loads(raw)
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
                outcome = await self._check(run_id, dead_worker=worker)
                counts[outcome] = counts.get(outcome, 0) + 1
        await self.redis.hdel(keys.WORKERS, *dead)
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
        lease_every = max(0.2, self.settings.lease_seconds / 3)
        next_lease_sweep = 0.0
        failing = False  # one line per outage, not one per sweep
        while not stop.is_set():
            now = time.monotonic()
            try:
                await self.timers.tick()
                await self.sweep_workers()
                if now >= next_lease_sweep:
                    await self.sweep()
                    next_lease_sweep = now + lease_every
                if now - self._trimmed_at >= TRIM_EVERY_SECONDS:
                    self._trimmed_at = now
                    await self.trim_indexes()
                    # Once per Redis: runs indexed before the status indexes existed.
                    await backfill_status_indexes(self.redis)
                if failing:
                    log.warning("supervisor: sweeping again")
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("supervisor: sweep failed (%s); retrying", exc)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_SECONDS)
