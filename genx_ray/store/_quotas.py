"""Per-tenant quotas on starting runs (``GENX_TENANT_LIMITS``), checked where runs enter: the API.

Two limits, each optional, by tenant (``"*"``: every tenant not named):

- ``runs_per_minute``: a token bucket holding that many tokens, refilled evenly over the minute
  (a burst of the whole minute's worth, then a steady rate; no window edge to game);
- ``running``: runs started and not finished (queued, running or waiting), kept as a sorted set
  of run ids that is pruned of finished runs only when it looks full, so the common case is one
  script call.

Over either, :class:`QuotaExceeded` (429) with the seconds to wait, and nothing is created. The
check and the token are one script (:data:`genx_ray.store._scripts.ADMIT_RUN`); a run is added to its
tenant's open set once it exists, so concurrent requests at the very edge may open a run or two
beyond ``running`` (never beyond the rate).
"""

from __future__ import annotations

import time
from typing import Any, cast

from genx_ray.model import TERMINAL, QuotaExceeded, TenantLimit
from genx_ray.store import _keys as keys
from genx_ray.store import _scripts as lua

FULL_RETRY_SECONDS = 5.0  # what a tenant at its cap of open runs is told to wait


class Quotas:
    def __init__(self, client: Any, limits: dict[str, TenantLimit] | Any) -> None:
        self.redis = client
        self.limits = dict(limits)

    def limit(self, tenant: str) -> TenantLimit | None:
        return self.limits.get(tenant) or self.limits.get("*")

    async def admit(self, tenant: str) -> None:
        """Take one run from ``tenant``'s quota, or raise :class:`QuotaExceeded`."""
        limit = self.limit(tenant)
        if limit is None:
            return
        k = keys.quota(tenant)
        args = [limit.runs_per_minute or 0, limit.running or 0, repr(time.time())]
        verdict = int(await lua.ADMIT_RUN(self.redis, [k.bucket, k.open], args))
        if verdict == -1 and await self._prune(k.open):
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

    async def _prune(self, open_key: str) -> int:
        """Drop the runs that finished (or expired) from an open set; how many went."""
        run_ids = cast(list[str], await self.redis.zrange(open_key, 0, -1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hget(keys.run(run_id), "status")
            statuses = await pipe.execute()
        done = [r for r, s in zip(run_ids, statuses, strict=True) if s is None or s in TERMINAL]
        if done:
            await self.redis.zrem(open_key, *done)
        return len(done)
