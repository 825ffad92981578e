"""Per-tenant quotas (``GENX_TENANT_LIMITS``), checked wherever runs start: the API, and each tick
of a schedule (:mod:`genx_ray.service._timers`).

Limits, each optional, by tenant (``"*"``: every tenant not named):

- ``runs_per_minute``: a token bucket holding that many tokens, refilled evenly over the minute
  (a burst of the whole minute's worth, then a steady rate; no window edge to game);
- ``running``: runs started and not finished (queued, scheduled, running or waiting), kept as a
  sorted set of run ids;
- ``schedules``: how many schedules the tenant may have (:mod:`genx_ray.store._schedules`;
  100 when nothing says otherwise).

Over either run limit, :class:`QuotaExceeded` (429) with the seconds to wait, and nothing is
created. The check and the token are one script (:data:`genx_ray.store._scripts.ADMIT_RUN`); a
run is added to its tenant's open set once it exists, so concurrent requests at the very edge may
open a run or two beyond ``running`` (never beyond the rate).

What must stay true: admission costs O(1) Redis commands whatever the number of open runs. A
full open set is pruned of finished runs ``PRUNE_BATCH`` of its oldest at a time; those still
open are moved to the back, so successive prunes walk the whole set, and a prune that found
nothing holds the next one off for ``PRUNE_EVERY_MS`` (a tenant holding its cap with runs
scheduled a year ahead costs each refused request one script and one ``EXISTS``, not a read of
every run). A run cancelled through the API leaves the set at once (:meth:`Quotas.closed`).
"""

from __future__ import annotations

import time
from typing import Any, cast

from genx_ray.model import DEFAULT_SCHEDULES, TERMINAL, QuotaExceeded, TenantLimit
from genx_ray.store import _keys as keys
from genx_ray.store import _scripts as lua

FULL_RETRY_SECONDS = 5.0  # what a tenant at its cap of open runs is told to wait
PRUNE_BATCH = 64  # open runs checked by one prune
PRUNE_EVERY_MS = 1000  # a tenant's open set is pruned at most this often


class Quotas:
    def __init__(self, client: Any, limits: dict[str, TenantLimit] | Any) -> None:
        self.redis = client
        self.limits = dict(limits)

    def limit(self, tenant: str) -> TenantLimit | None:
        return self.limits.get(tenant) or self.limits.get("*")

    def most_schedules(self, tenant: str) -> int:
        """How many schedules ``tenant`` may have: its own limit, else ``"*"``'s, else 100."""
        for name in (tenant, "*"):
            limit = self.limits.get(name)
            if limit is not None and limit.schedules:
                return int(limit.schedules)
        return DEFAULT_SCHEDULES

    async def admit(self, tenant: str) -> None:
        """Take one run from ``tenant``'s quota, or raise :class:`QuotaExceeded`."""
        limit = self.limit(tenant)
        if limit is None or not (limit.runs_per_minute or limit.running):
            return
        k = keys.quota(tenant)
        args = [limit.runs_per_minute or 0, limit.running or 0, repr(time.time())]
        verdict = int(await lua.ADMIT_RUN(self.redis, [k.bucket, k.open], args))
        if verdict == -1 and await self._prune(k):
            verdict = int(await lua.ADMIT_RUN(self.redis, [k.bucket, k.open], args))
        if verdict == -1:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {limit.running} runs in progress, its most "
                "(GENX_TENANT_LIMITS); retry when some have finished",
                FULL_RETRY_SECONDS,
            )
        if verdict > 0:
            raise QuotaExceeded(
                f"tenant {tenant!r} started {limit.runs_per_minute} runs in the last minute, "
                "its most (GENX_TENANT_LIMITS)",
                verdict / 1000,
            )

    async def opened(self, tenant: str, run_id: str) -> None:
        """Count a run the tenant started against its ``running`` limit (if it has one)."""
        limit = self.limit(tenant)
        if limit is not None and limit.running:
            await self.redis.zadd(keys.quota(tenant).open, {run_id: time.time()})

    async def refund(self, tenant: str) -> None:
        """Give back the token of an admitted request that started no run (an idempotent
        replay of one started before)."""
        limit = self.limit(tenant)
        if limit is not None and limit.runs_per_minute:
            await self.redis.hincrbyfloat(keys.quota(tenant).bucket, "tokens", 1)

    async def closed(self, tenant: str, run_id: str) -> None:
        """A run of the tenant ended where its tenant is known (a cancel through the API): its
        place is free at once, not at the next prune."""
        limit = self.limit(tenant)
        if limit is not None and limit.running:
            await self.redis.zrem(keys.quota(tenant).open, run_id)

    async def _prune(self, k: keys.QuotaKeys) -> int:
        """Drop the finished (or expired) runs among the oldest of a full open set; move those
        still open to the back. How many went. A prune that found nothing holds the next one
        off for PRUNE_EVERY_MS: a tenant at its cap costs one script and a GET per request."""
        if await self.redis.exists(k.pruning):
            return 0
        run_ids = cast(list[str], await self.redis.zrange(k.open, 0, PRUNE_BATCH - 1))
        if not run_ids:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hget(keys.run(run_id), "status")
            statuses = await pipe.execute()
        done = [r for r, s in zip(run_ids, statuses, strict=True) if s is None or s in TERMINAL]
        still = [r for r, s in zip(run_ids, statuses, strict=True) if r not in done]
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:  # one slot: the tenant's
            if done:
                pipe.zrem(k.open, *done)
            if still:
                pipe.zadd(k.open, dict.fromkeys(still, now), xx=True)
            if not done:
                pipe.set(k.pruning, "1", px=PRUNE_EVERY_MS)
            await pipe.execute()
        return len(done)
