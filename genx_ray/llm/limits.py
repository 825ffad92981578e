"""Cluster-wide provider limits in Redis: concurrency, requests and tokens per minute.

Every process sharing the Redis shares each budget (``GENX_LLM_LIMITS``, by model glob). A
concurrency slot is a lease with an expiry, refreshed while the call runs, so a crashed holder's
slot comes back on its own. Token use is estimated before a call and corrected from the usage
the provider reports. A ``Retry-After`` pauses the whole budget for every process, not just the
caller. In each process one pump task per budget asks Redis for slots on behalf of all the
callers waiting there, in arrival order, as many at once as the budget allows; a release in the
process wakes it at once, a release elsewhere is seen within ``POLL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from redis.exceptions import NoScriptError

from genx_ray.keys import PREFIX
from genx_ray.settings import LLMLimit

POLL_SECONDS = 0.05
_BATCH = 256  # waiters considered per script call
PAUSE_CACHE_SECONDS = 0.1

# KEYS: conc, req, tok, pause. ARGV: now ms, id prefix, lease ms, conc cap, rpm, tpm (0 = no
# cap), then the token estimate of each caller waiting, in order. Grants slots to the first
# callers while the budget allows; returns {granted, ms to wait at least (0: until a release)}.
# Slot i's id is '<prefix>-<i>'.
_ACQUIRE = """
local now = tonumber(ARGV[1])
local paused = redis.call('PTTL', KEYS[4])
if paused > 0 then return {0, paused} end
local conc, rpm, tpm = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local held, requests, used = 0, 0, 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  held = redis.call('ZCARD', KEYS[1])
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
  requests = redis.call('ZCARD', KEYS[2])
end
if tpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 60000)
  for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    used = used + tonumber(string.match(member, ':(%d+)$'))
  end
end
local granted, wait = 0, 0
for i = 7, #ARGV do
  local tokens = tonumber(ARGV[i])
  if conc > 0 and held >= conc then break end
  if rpm > 0 and requests >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    wait = tonumber(oldest[2]) + 60000 - now
    break
  end
  if tpm > 0 and used > 0 and used + tokens > tpm then
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    wait = tonumber(oldest[2]) + 60000 - now
    break
  end
  local id = ARGV[2] .. '-' .. (granted + 1)
  if conc > 0 then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), id) end
  if rpm > 0 then redis.call('ZADD', KEYS[2], now, id) end
  if tpm > 0 then redis.call('ZADD', KEYS[3], now, id .. ':' .. tokens) end
  held, requests, used, granted = held + 1, requests + 1, used + tokens, granted + 1
end
if granted > 0 then
  if rpm > 0 then redis.call('PEXPIRE', KEYS[2], 61000) end
  if tpm > 0 then redis.call('PEXPIRE', KEYS[3], 61000) end
end
return {granted, wait}
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
        self._queues: dict[str, deque[tuple[asyncio.Future[Slot], int]]] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._wakers: dict[str, asyncio.Event] = {}  # set when a slot of this process frees
        self._pauses: dict[str, tuple[float, float]] = {}  # budget -> (checked at, paused until)

    def budget(self, model: str) -> tuple[str, LLMLimit]:
        """The budget a model draws on: its glob's, or (no limits) its own, which only a
        ``Retry-After`` pause applies to."""
        glob = match(self.limits, model)
        return (glob, self.limits[glob]) if glob is not None else (model, LLMLimit())

    async def acquire(self, model: str, tokens: int) -> Slot:
        """Wait for room in the model's budget (and for any pause on it to end)."""
        glob, limit = self.budget(model)
        if not (limit.concurrency or limit.rpm or limit.tpm):
            await self._wait_out_pause(glob)  # no budget to take from: only a pause applies
            return Slot(glob, "", tokens)
        waiter: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(glob, deque()).append((waiter, tokens))
        if glob not in self._pumps or self._pumps[glob].done():
            self._pumps[glob] = asyncio.create_task(self._pump(glob, limit))
        else:
            self._wakers.setdefault(glob, asyncio.Event()).set()
        try:
            slot = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted as we were cancelled
                await self.release(waiter.result())
            raise
        if limit.concurrency:
            slot.refresher = asyncio.create_task(self._refresh(slot))
        return slot

    async def _wait_out_pause(self, glob: str) -> None:
        """Sleep through a ``Retry-After`` pause on an unlimited budget. The pause is read from
        Redis at most every ``PAUSE_CACHE_SECONDS`` per budget, not on every call."""
        now = time.monotonic()
        checked, until = self._pauses.get(glob, (0.0, 0.0))
        if now - checked >= PAUSE_CACHE_SECONDS:
            ms = int(await self.redis.pttl(_keys(glob)[3]))
            until = now + ms / 1000 if ms > 0 else 0.0
            self._pauses[glob] = (now, until)
        if until > now:
            await asyncio.sleep(until - now)

    async def _pump(self, glob: str, limit: LLMLimit) -> None:
        """Grant slots to this process's waiters of one budget, oldest first, in batches."""
        queue = self._queues[glob]
        wake = self._wakers.setdefault(glob, asyncio.Event())
        while True:
            while queue and queue[0][0].done():  # cancelled while waiting
                queue.popleft()
            if not queue:
                return
            wake.clear()
            prefix = secrets.token_hex(6)
            batch = [tokens for _, tokens in list(queue)[:_BATCH]]
            granted, wait_ms = await self._acquire(
                keys=_keys(glob),
                args=[int(time.time() * 1000), prefix, int(self.lease_seconds * 1000),
                      limit.concurrency or 0, limit.rpm or 0, limit.tpm or 0, *batch],
            )  # fmt: skip
            for i in range(int(granted)):
                waiter, tokens = queue.popleft()
                slot = Slot(glob, f"{prefix}-{i + 1}", tokens)
                if waiter.done():  # cancelled meanwhile: give the slot straight back
                    await self.release(slot)
                else:
                    waiter.set_result(slot)
            if queue and not granted:
                hint = int(wait_ms) / 1000
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(max(hint, POLL_SECONDS), 5.0))

    async def _refresh(self, slot: Slot) -> None:
        conc_key = _keys(slot.glob)[0]
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            with contextlib.suppress(Exception):
                await self.redis.zadd(
                    conc_key, {slot.id: int((time.time() + self.lease_seconds) * 1000)}, xx=True
                )

    async def release(
        self,
        slot: Slot,
        actual_tokens: int | None = None,
        also: Callable[[Any], None] | None = None,
    ) -> None:
        """Free the slot (correcting its token estimate); ``also`` adds commands to the same
        pipeline, so the caller's bookkeeping costs no extra round trip."""
        if slot.refresher is not None:
            slot.refresher.cancel()
        if not slot.id and also is None:
            return  # an unlimited budget, nothing to book
        keys = _keys(slot.glob)
        actual = -1 if actual_tokens is None else actual_tokens
        async with self.redis.pipeline(transaction=False) as pipe:
            if slot.id:
                # EVALSHA straight into the pipeline: a Script object would cost a SCRIPT EXISTS
                # round trip per pipeline. The acquire script, run before, loaded it... unless
                # Redis restarted since; then the slow path loads it again.
                pipe.evalsha(self._release.sha, 2, keys[0], keys[2], slot.id, slot.tokens, actual)
            if also is not None:
                also(pipe)
            try:
                await pipe.execute()
            except NoScriptError:  # the rest of the pipeline ran; only the release is redone
                await self._release(keys=[keys[0], keys[2]], args=[slot.id, slot.tokens, actual])
        if slot.glob in self._wakers:
            self._wakers[slot.glob].set()  # a waiter of this process goes now, not at its poll

    async def pause(self, model: str, seconds: float) -> None:
        """Honour a provider's ``Retry-After`` for every process sharing the budget."""
        if seconds > 0:
            await self._pause(keys=[_keys(self.budget(model)[0])[3]], args=[int(seconds * 1000)])
