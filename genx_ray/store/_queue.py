"""The run queue: runs waiting to start, taken by workers most urgent first and, within one
priority, fairly across tenants, weighted (``GENX_TENANT_LIMITS`` ``"weight"``), then FIFO.

Every key lives in one Redis Cluster slot (the hash tag ``{genx:queue}``), so one script takes a
whole batch in one round trip:

- per priority (1 most urgent .. 5) and tenant, a sorted set of entries by when they were
  queued (us): the tenant's FIFO at that priority;
- per priority, a sorted set of the tenants with entries there, by virtual time: the script takes
  from the tenant whose virtual time is lowest, and advances it by ``1 / weight``. A tenant that
  joins (or comes back) starts at the priority's clock, the virtual time of the last entry
  taken: never behind the others by more than one round, never ahead of them by its history.
  Taking an entry is O(log n) in the backlog;
- the entries taken and not yet acknowledged, with who took each (a set per worker) and when.

An entry is acknowledged once its run has been claimed (its lease covers it from then on) or
handed back. Entries a worker took and had not started when it died stay held under its name.
Every worker looks for such entries twice a second (:meth:`RunQueue.take`): those of a worker
whose heartbeat in the worker table is older than ``dead_after`` (``WORKER_DEAD_SECONDS``, or
``GENX_LEASE_SECONDS`` if shorter) are taken over at once, so a run taken by a dead worker
starts again within the bound a started run's restart has. A live worker keeps its entries,
however slow it is (and if two workers ever start the same entry, the run's attempt fencing lets
one claim it). Entries held ``STALE_HELD_MS`` (a live worker whose placement failed, a process
that never heartbeats) are taken over whoever holds them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from genx_ray.model import DEFAULT_PRIORITY, DEFAULT_TENANT
from genx_ray.store import _keys as keys
from genx_ray.store._scripts import Script

PRIORITIES = range(1, 6)  # 1 most urgent

# An entry held this long is taken over whoever holds it. Generous on purpose: a dead worker's
# entries are taken over as soon as it is known dead (below); the run's attempt decides.
STALE_HELD_MS = 60_000
STALE_EVERY_SECONDS = 5.0  # how often a worker looks for such entries
STRANDED_EVERY_SECONDS = 0.5  # how often a worker looks for entries of dead workers
WORKER_DEAD_SECONDS = 3.0  # a worker whose heartbeat is older than this is gone


def worker_alive(
    entry: Mapping[str, Any], now: float, dead_after: float = WORKER_DEAD_SECONDS
) -> bool:
    """Whether a worker table entry heartbeated within ``dead_after`` seconds."""
    return now - float(entry.get("seen", 0)) < dead_after


# KEYS[1]: the queue's tag (keys.QUEUE). ARGV: worker, count, now ms.
# Takes up to count entries: most urgent priority first; within it, the tenant with the lowest
# virtual time (raised to the priority's clock if behind), advanced by 1/weight per entry.
# Returns {entry, queued (us), priority, tenant, ...}.
TAKE = Script("""
local base, worker, want, now = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out = {}
local got = 0
for p = 1, 5 do
  local ready = base .. ':ready:' .. p
  local clock_key = base .. ':clock:' .. p
  while got < want do
    local top = redis.call('ZRANGE', ready, 0, 0, 'WITHSCORES')
    if #top == 0 then break end
    local tenant, vt = top[1], tonumber(top[2])
    local clock = tonumber(redis.call('GET', clock_key) or '0')
    if vt < clock then vt = clock end
    local q = base .. ':q:' .. p .. ':' .. tenant
    local e = redis.call('ZPOPMIN', q)
    if #e == 0 then
      redis.call('ZREM', ready, tenant)
    else
      got = got + 1
      out[#out + 1] = e[1]; out[#out + 1] = e[2]; out[#out + 1] = p; out[#out + 1] = tenant
      redis.call('ZADD', base .. ':taken', now, e[1])
      redis.call('HSET', base .. ':owner', e[1], worker)
      redis.call('SADD', base .. ':held:' .. worker, e[1])
      redis.call('SADD', base .. ':holders', worker)
      redis.call('SET', clock_key, tostring(vt))
      if redis.call('ZCARD', q) == 0 then
        redis.call('ZREM', ready, tenant)
      else
        local wk = base .. ':weights'
        local w = tonumber(redis.call('HGET', wk, tenant) or redis.call('HGET', wk, '*') or '1')
        redis.call('ZADD', ready, vt + 1 / w, tenant)
      end
    end
  end
end
return out
""")

# KEYS[1]: the queue's tag. ARGV: entries. Forgets each (its run was claimed or handed back).
ACK = Script("""
local base = KEYS[1]
for i = 1, #ARGV do
  local owner = redis.call('HGET', base .. ':owner', ARGV[i])
  if owner then
    local held = base .. ':held:' .. owner
    redis.call('SREM', held, ARGV[i])
    if redis.call('SCARD', held) == 0 then redis.call('SREM', base .. ':holders', owner) end
    redis.call('HDEL', base .. ':owner', ARGV[i])
  end
  redis.call('ZREM', base .. ':taken', ARGV[i])
end
return #ARGV
""")

# KEYS[1]: the queue's tag. ARGV: worker taking over, now ms, count, then the entries to take
# over (if still held by someone) or, with none, a dead worker's name in ARGV[4] prefixed '@'.
# Returns the entries taken over.
TAKE_OVER = Script("""
local base, me, now, want = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local entries = {}
if string.sub(ARGV[4], 1, 1) == '@' then
  entries = redis.call('SRANDMEMBER', base .. ':held:' .. string.sub(ARGV[4], 2), want)
else
  for i = 4, #ARGV do entries[#entries + 1] = ARGV[i] end
end
local out = {}
for _, entry in ipairs(entries) do
  local owner = redis.call('HGET', base .. ':owner', entry)
  if owner and owner ~= me then
    local held = base .. ':held:' .. owner
    redis.call('SREM', held, entry)
    if redis.call('SCARD', held) == 0 then redis.call('SREM', base .. ':holders', owner) end
    redis.call('HSET', base .. ':owner', entry, me)
    redis.call('SADD', base .. ':held:' .. me, entry)
    redis.call('SADD', base .. ':holders', me)
    redis.call('ZADD', base .. ':taken', now, entry)
    out[#out + 1] = entry
  end
end
return out
""")

# KEYS[1]: the queue's tag. ARGV: how many. The entries at the head of the queue, roughly in
# the order they will be taken (most urgent first, each tenant's first few), without taking them.
PEEK = Script("""
local base, want = KEYS[1], tonumber(ARGV[1])
local out = {}
for p = 1, 5 do
  for _, tenant in ipairs(redis.call('ZRANGE', base .. ':ready:' .. p, 0, want - 1)) do
    for _, e in ipairs(redis.call('ZRANGE', base .. ':q:' .. p .. ':' .. tenant, 0, want - 1)) do
      out[#out + 1] = e
      if #out >= want then return out end
    end
  end
end
return out
""")

# KEYS[1]: the queue's tag. Returns {priority, tenant, depth, oldest queued (us), ...}.
STATE = Script("""
local base = KEYS[1]
local out = {}
for p = 1, 5 do
  for _, tenant in ipairs(redis.call('ZRANGE', base .. ':ready:' .. p, 0, -1)) do
    local q = base .. ':q:' .. p .. ':' .. tenant
    local first = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
    if #first > 0 then
      out[#out + 1] = p; out[#out + 1] = tenant
      out[#out + 1] = redis.call('ZCARD', q); out[#out + 1] = first[2]
    end
  end
end
return out
""")


def _tenant_queue(priority: int, tenant: str) -> str:
    return f"{keys.QUEUE}:q:{priority}:{keys.part(tenant)}"


def _ready(priority: int) -> str:
    return f"{keys.QUEUE}:ready:{priority}"


def entry_of(
    run_id: str, attempt: int | None, workflow: str | None, tenant: str, priority: int
) -> str:
    """An entry as the queue holds it (one per run attempt: queued twice, it is one)."""
    return json.dumps([run_id, attempt, workflow, tenant, priority], separators=(",", ":"))


_last_us = 0


def _queued_us(now: float | None) -> int:
    """When queued, in microseconds: the FIFO order of a tenant's entries (increasing within
    a process; exact in a sorted set's double up to year 2255)."""
    global _last_us
    if now is not None:  # put back where it was
        return int(now * 1e6)
    _last_us = us = max(time.time_ns() // 1000, _last_us + 1)
    return us


def put_commands(
    pipe: Any, run_id: str, attempt: int | None, workflow: str | None, tenant: str,
    priority: int = DEFAULT_PRIORITY, now: float | None = None,
) -> None:  # fmt: skip
    """Queue a run's attempt, as two commands on ``pipe`` (one slot; the tenant is listed after
    its entry is in: a take between the two finds it at the next one)."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be 1..5, not {priority!r}")
    entry = entry_of(run_id, attempt, workflow, tenant, priority)
    pipe.zadd(_tenant_queue(priority, tenant), {entry: _queued_us(now)})
    pipe.zadd(_ready(priority), {keys.part(tenant): 0}, nx=True)


@dataclass(frozen=True, slots=True)
class QueueEntry:
    id: str  # the entry as the queue holds it, to acknowledge
    run_id: str
    attempt: int | None = None
    workflow: str | None = None
    priority: int = DEFAULT_PRIORITY
    tenant: str = DEFAULT_TENANT
    queued_us: int | None = None  # when it was queued (unix us), as taken from the queue

    @classmethod
    def of(cls, entry: str, queued_us: int | None = None) -> QueueEntry:
        run_id, attempt, workflow, tenant, priority = json.loads(entry)
        return cls(entry, run_id, attempt, workflow, priority, tenant, queued_us)


class RunQueue:
    def __init__(self, client: Any, *, dead_after: float = WORKER_DEAD_SECONDS) -> None:
        """``dead_after``: seconds after its last heartbeat a worker's held entries are taken
        over by others."""
        self.redis = client
        self.dead_after = dead_after
        self._stale_at = 0.0
        self._stranded_at = 0.0

    async def put(
        self, run_id: str, attempt: int | None = None, workflow: str | None = None, *,
        tenant: str, priority: int = DEFAULT_PRIORITY, queued_at: float | None = None,
    ) -> None:  # fmt: skip
        """Queue a run's attempt (``queued_at``: where it was, for one put back)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            put_commands(pipe, run_id, attempt, workflow, tenant, priority, queued_at)
            await pipe.execute()

    async def set_weights(self, weights: Mapping[str, int]) -> None:
        """Tenants' weights (``GENX_TENANT_LIMITS`` ``"weight"``; ``"*"``'s for the others,
        else 1), for every worker: the last worker started says."""
        if weights:
            mapping = {t if t == "*" else keys.part(t): w for t, w in weights.items()}
            await self.redis.hset(f"{keys.QUEUE}:weights", mapping=mapping)

    async def move_old_queue(self) -> int:
        """Runs left in the queue of a version before priorities (a stream): queued here, at
        their tenant's default priority (once; returns how many)."""
        entries = await self.redis.xrange(keys.OLD_QUEUE, "-", "+")
        if not entries:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, fields in entries:
                pipe.hmget(keys.run(fields["run"]), "attempt", "workflow", "tenant", "priority")
            found = await pipe.execute()
        for (_, fields), (attempt, workflow, tenant, priority) in zip(entries, found, strict=True):
            if attempt is not None:
                await self.put(fields["run"], int(fields.get("attempt") or attempt), str(workflow),
                               tenant=str(tenant or DEFAULT_TENANT),
                               priority=int(priority or DEFAULT_PRIORITY))  # fmt: skip
        await self.redis.delete(keys.OLD_QUEUE)
        return len(entries)

    async def take(self, consumer: str, count: int) -> list[QueueEntry]:
        """Up to ``count`` entries (one round trip): those of dead workers first (looked for
        twice a second), then long-held ones (every few seconds), then queued ones."""
        now = time.monotonic()
        if now - self._stranded_at >= STRANDED_EVERY_SECONDS:
            self._stranded_at = now
            stranded = await self.stranded(consumer, count)
            if stranded:
                return stranded
        if now - self._stale_at >= STALE_EVERY_SECONDS:
            stale = await self._stale(consumer, count)
            if stale:
                return stale  # there may be more: look again next time
            self._stale_at = now
        got = cast(list[Any], await TAKE(self.redis, [keys.QUEUE],
                                         [consumer, count, int(time.time() * 1000)]))  # fmt: skip
        return [QueueEntry.of(str(got[i]), int(float(got[i + 1]))) for i in range(0, len(got), 4)]

    async def stranded(self, consumer: str, count: int) -> list[QueueEntry]:
        """Take over for ``consumer`` up to ``count`` entries held by workers whose heartbeat
        is older than ``dead_after`` (one round trip when none is dead)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smembers(f"{keys.QUEUE}:holders")
            pipe.hgetall(keys.WORKERS)
            holders, table = await pipe.execute()
        now = time.time()
        dead = [
            str(name) for name in holders
            if name != consumer and (raw := table.get(name)) is not None
            and not worker_alive(json.loads(raw), now, self.dead_after)
        ]  # fmt: skip
        taken: list[QueueEntry] = []
        for name in dead:
            args = [consumer, int(now * 1000), count - len(taken), f"@{name}"]
            got = await TAKE_OVER(self.redis, [keys.QUEUE], args)
            taken += [QueueEntry.of(str(e)) for e in got]
            if len(taken) >= count:
                break
        return taken

    async def _stale(self, consumer: str, count: int) -> list[QueueEntry]:
        cutoff = int(time.time() * 1000) - STALE_HELD_MS
        old = await self.redis.zrangebyscore(f"{keys.QUEUE}:taken", "-inf", cutoff, 0, count)
        if not old:
            return []
        got = await TAKE_OVER(self.redis, [keys.QUEUE],
                              [consumer, int(time.time() * 1000), count, *old])  # fmt: skip
        return [QueueEntry.of(str(e)) for e in got]

    async def peek(self, count: int) -> list[QueueEntry]:
        """About the next ``count`` entries to be taken, left in place."""
        got = await PEEK(self.redis, [keys.QUEUE], [count])
        return [QueueEntry.of(str(e)) for e in got]

    async def holding(self, workers: list[str]) -> set[str]:
        """Those of these workers that hold entries (taken, not yet claimed or handed back)."""
        holders = await self.redis.smembers(f"{keys.QUEUE}:holders")
        return {str(h) for h in holders} & set(workers)

    async def held(self, worker: str) -> list[QueueEntry]:
        """The entries a worker holds."""
        return [QueueEntry.of(str(e)) for e in await self.redis.smembers(
            f"{keys.QUEUE}:held:{worker}")]  # fmt: skip

    async def ack(self, *entry_ids: str) -> None:
        if entry_ids:
            await ACK(self.redis, [keys.QUEUE], list(entry_ids))


@dataclass(frozen=True, slots=True)
class QueueDepth:
    priority: int
    tenant: str
    depth: int
    oldest_age: float  # seconds


async def queue_depths(redis: Any) -> list[QueueDepth]:
    """What waits, by priority and tenant (one round trip)."""
    got = cast(list[Any], await STATE(redis, [keys.QUEUE], []))
    now = time.time()
    return [
        QueueDepth(
            int(got[i]),
            keys.unpart(str(got[i + 1])),
            int(got[i + 2]),
            max(0.0, now - float(got[i + 3]) / 1e6),
        )
        for i in range(0, len(got), 4)
    ]


async def queue_state(redis: Any) -> tuple[int, float]:
    """The run queue's depth and the age of its oldest entry (seconds), read now."""
    depths = await queue_depths(redis)
    return sum(d.depth for d in depths), max((d.oldest_age for d in depths), default=0.0)


async def queue_gauges(redis: Any) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """The queue's gauges for ``/metrics`` (one round trip): its depth and oldest age, and the
    same by tenant and priority."""
    depths = await queue_depths(redis)
    gauges = {
        "genx_queue_depth": float(sum(d.depth for d in depths)),
        "genx_queue_oldest_age_seconds": max((d.oldest_age for d in depths), default=0.0),
    }
    by = [({"tenant": d.tenant, "priority": str(d.priority)}, d) for d in depths]
    labelled = {
        "genx_queue_tenant_depth": [(labels, float(d.depth)) for labels, d in by],
        "genx_queue_tenant_oldest_age_seconds": [(labels, d.oldest_age) for labels, d in by],
    }
    return gauges, labelled
