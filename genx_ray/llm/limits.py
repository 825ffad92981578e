"""Cluster-wide provider limits in Redis: concurrency, requests and tokens per minute.

Every process sharing the Redis shares each budget (``GENX_LLM_LIMITS``, by model glob). A
concurrency slot is a lease with an expiry, refreshed while the call runs, so a crashed holder's
slot comes back on its own. Token use is estimated before a call and corrected from the usage
the provider reports. A ``Retry-After`` pauses the whole budget for every process, not just the
caller. Waiting callers of one process are served in arrival order; across processes a freed
slot goes to the first to ask, each process re-checking at least every ``POLL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import secrets
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import redis.asyncio

from genx_ray.keys import PREFIX
from genx_ray.settings import LLMLimit

POLL_SECONDS = 0.05

# KEYS: conc, req, tok, pause. ARGV: now ms, id, lease ms, conc cap, rpm, tpm, tokens (0 = no cap)
# Returns {1, 0} when granted, else {0, ms to wait at least}.
_ACQUIRE = """
local now = tonumber(ARGV[1])
local paused = redis.call('PTTL', KEYS[4])
if paused > 0 then return {0, paused} end
local conc, rpm = tonumber(ARGV[4]), tonumber(ARGV[5])
local tpm, tokens = tonumber(ARGV[6]), tonumber(ARGV[7])
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= conc then return {0, 0} end
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
  if redis.call('ZCARD', KEYS[2]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {0, tonumber(oldest[2]) + 60000 - now}
  end
end
if tpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 60000)
  local used = 0
  for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    used = used + tonumber(string.match(member, ':(%d+)$'))
  end
  if used > 0 and used + tokens > tpm then
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    return {0, tonumber(oldest[2]) + 60000 - now}
  end
end
if conc > 0 then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2]) end
if rpm > 0 then redis.call('ZADD', KEYS[2], now, ARGV[2]); redis.call('PEXPIRE', KEYS[2], 61000) end
if tpm > 0 then
  redis.call('ZADD', KEYS[3], now, ARGV[2] .. ':' .. tokens); redis.call('PEXPIRE', KEYS[3], 61000)
end
return {1, 0}
"""

# KEYS: conc, tok. ARGV: id, estimated tokens, actual tokens (-1 = unknown).
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(ARGV[3]) >= 0 then
  local old = ARGV[1] .. ':' .. ARGV[2]
  local score = redis.call('ZSCORE', KEYS[2], old)
  if score then
    redis.call('ZREM', KEYS[2], old)
    redis.call('ZADD', KEYS[2], score, ARGV[1] .. ':' .. ARGV[3])
  end
end
return 1
"""

# KEYS: pause. ARGV: ms. Extends the pause; never shortens one in force.
_PAUSE = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
"""


def _keys(glob: str) -> list[str]:
    tag = f"{PREFIX}:llm:{{{glob}}}"  # one hash slot per budget: the scripts stay cluster-valid
    return [f"{tag}:conc", f"{tag}:req", f"{tag}:tok", f"{tag}:pause"]


def match(limits: Mapping[str, LLMLimit], model: str) -> str | None:
    """The glob whose budget a model uses: an exact name first, then the longest glob."""
    if model in limits:
        return model
    found = [g for g in limits if fnmatch.fnmatchcase(model, g)]
    return max(found, key=len) if found else None


@dataclass
class Slot:
    glob: str
    id: str
    tokens: int
    refresher: asyncio.Task[None] | None = None


class Limiter:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        limits: Mapping[str, LLMLimit],
        lease_seconds: float = 60.0,
    ) -> None:
        self.redis, self.limits = client, dict(limits)
        self.lease_seconds = lease_seconds  # a slot's lease; refreshed every third of it
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._pause = client.register_script(_PAUSE)
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}
        self._wakers: dict[str, asyncio.Event] = {}  # set when a slot of this process frees

    def budget(self, model: str) -> tuple[str, LLMLimit]:
        """The budget a model draws on: its glob's, or (no limits) its own, which only a
        ``Retry-After`` pause applies to."""
        glob = match(self.limits, model)
        return (glob, self.limits[glob]) if glob is not None else (model, LLMLimit())

    async def acquire(self, model: str, tokens: int) -> Slot:
        """Wait for room in the model's budget (and for any pause on it to end)."""
        glob, limit = self.budget(model)
        slot = Slot(glob, secrets.token_hex(8), tokens)
        queue = self._queues.setdefault(glob, deque())
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(turn)
        if queue[0] is turn:
            turn.set_result(None)
        try:
            await turn  # this process's callers go in arrival order
            while True:
                granted, wait_ms = await self._acquire(
                    keys=_keys(glob),
                    args=[int(time.time() * 1000), slot.id, int(self.lease_seconds * 1000),
                          limit.concurrency or 0, limit.rpm or 0, limit.tpm or 0, tokens],
                )  # fmt: skip
                if granted:
                    break
                await self._wait(
                    glob,
                    max(POLL_SECONDS, min(int(wait_ms) / 1000, 5.0)) if wait_ms else POLL_SECONDS,
                )
        finally:
            queue.remove(turn) if turn in queue else None
            if queue and not queue[0].done():
                queue[0].set_result(None)
        if limit.concurrency:
            slot.refresher = asyncio.create_task(self._refresh(slot))
        return slot

    async def _wait(self, glob: str, seconds: float) -> None:
        wake = self._wakers.setdefault(glob, asyncio.Event())
        wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)

    async def _refresh(self, slot: Slot) -> None:
        conc_key = _keys(slot.glob)[0]
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            with contextlib.suppress(Exception):
                await self.redis.zadd(
                    conc_key, {slot.id: int((time.time() + self.lease_seconds) * 1000)}, xx=True
                )

    async def release(self, slot: Slot, actual_tokens: int | None = None) -> None:
        if slot.refresher is not None:
            slot.refresher.cancel()
        keys = _keys(slot.glob)
        await self._release(
            keys=[keys[0], keys[2]],
            args=[slot.id, slot.tokens, -1 if actual_tokens is None else actual_tokens],
        )
        if slot.glob in self._wakers:
            self._wakers[slot.glob].set()  # a waiter of this process goes now, not at its poll

    async def pause(self, model: str, seconds: float) -> None:
        """Honour a provider's ``Retry-After`` for every process sharing the budget."""
        if seconds > 0:
            await self._pause(keys=[_keys(self.budget(model)[0])[3]], args=[int(seconds * 1000)])
