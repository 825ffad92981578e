"""Finding runs whose host died, and restarting them from their journal.

Every worker runs one; any number may run at once. A run is orphaned when it is ``running`` and
its lease key has expired. One script re-checks that and the attempt number atomically, then
requeues the run as ``attempt + 1`` with a ``run.restarted`` event, or, past the attempt cap,
fails it with the reason. Two supervisors racing for one run: the second finds the attempt moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, cast

import redis.asyncio

from genx_ray import keys
from genx_ray.events import ErrorInfo, RunFailed, RunRestarted, dumps
from genx_ray.settings import Settings
from genx_ray.webhooks import notify

log = logging.getLogger("genx_ray.supervisor")

# KEYS: run hash, events, journal, lease. ARGV: attempt seen, max attempts, restarted event,
# failed event, failed error JSON, now, maxlen, retention seconds.
_REAP = """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if st[1] ~= 'running' then return 'gone' end
if st[2] ~= ARGV[1] then return 'raced' end
if redis.call('EXISTS', KEYS[4]) == 1 then return 'alive' end
if tonumber(ARGV[1]) >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[5], 'finished_at', ARGV[6])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'e', ARGV[4])
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[8]) end
  return 'failed'
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempt', tonumber(ARGV[1]) + 1,
           'requeued_at', ARGV[6])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'e', ARGV[3])
return 'requeued'
"""


class Supervisor:
    def __init__(self, client: redis.asyncio.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._reap = client.register_script(_REAP)

    async def sweep(self) -> dict[str, int]:
        """One pass over runs whose last heartbeat is older than the lease; returns counts."""
        counts: dict[str, int] = {}
        cutoff = time.time() - self.settings.lease_seconds
        stale = cast(
            list[str],
            await self.redis.zrangebyscore(keys.LEASES, "-inf", cutoff, start=0, num=200),
        )
        for run_id in stale:
            outcome = await self._check(run_id)
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    async def _check(self, run_id: str) -> str:
        attempt = await self.redis.hget(keys.run(run_id), "attempt")
        if attempt is None:
            await self.redis.zrem(keys.LEASES, run_id)
            return "gone"
        n = int(attempt)
        lease_s = self.settings.lease_seconds
        reason = (
            f"the run host of attempt {n} stopped heartbeating (no lease renewal in {lease_s}s)"
        )
        error = ErrorInfo(
            type="RunHostLost",
            message=f"{reason}; {n} of {self.settings.max_attempts} attempts used",
        )
        args: list[Any] = [
            n, self.settings.max_attempts,
            dumps(RunRestarted(run_id=run_id, attempt=n + 1, reason=reason)),
            dumps(RunFailed(run_id=run_id, error=error)), error.model_dump_json(),
            repr(time.time()), self.settings.stream_maxlen, self.settings.retention_seconds,
        ]  # fmt: skip
        outcome = str(
            await self._reap(keys=[*keys.run_keys(run_id), keys.lease(run_id)], args=args)
        )
        if outcome == "requeued":
            log.warning("run %s: %s; requeued as attempt %d", run_id, reason, n + 1)
            await self.redis.xadd(keys.QUEUE, {"run": run_id})
        elif outcome == "failed":
            log.warning("run %s: %s; failed after %d attempts", run_id, reason, n)
            await notify(self.redis, self.settings, run_id)
        if outcome in ("requeued", "failed", "gone"):
            await self.redis.zrem(keys.LEASES, run_id)
        return outcome

    async def serve(self, stop: asyncio.Event) -> None:
        interval = max(0.2, self.settings.lease_seconds / 3)
        while not stop.is_set():
            try:
                await self.sweep()
            except (OSError, redis.RedisError) as exc:
                log.warning("supervisor: sweep failed (%s)", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
