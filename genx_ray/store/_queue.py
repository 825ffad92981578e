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
Every worker looks for such entries five times a second (:meth:`RunQueue.take`): those of a worker
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
from genx_ray.store import _queue_scripts as queue_lua

PRIORITIES = range(1, 6)  # 1 most urgent

# An entry held this long is taken over whoever holds it. Generous on purpose: a dead worker's
# entries are taken over as soon as it is known dead (below); the run's attempt decides.
STALE_HELD_MS = 60_000
STALE_EVERY_SECONDS = 5.0  # how often a worker looks for such entries
STRANDED_EVERY_SECONDS = 0.2  # how often a worker looks for entries of dead workers
WORKER_DEAD_SECONDS = 3.0  # a worker whose heartbeat is older than this is gone


def worker_alive(
    entry: Mapping[str, Any], now: float, dead_after: float = WORKER_DEAD_SECONDS
) -> bool:
    """Whether a worker table entry heartbeated within ``dead_after`` seconds."""
    return now - float(entry.get("seen", 0)) < dead_after


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
        """Runs in the queue of a version before priorities (a stream: what older gateways or
        supervisors still queue during an upgrade), queued here at their run's priority;
        returns how many. Supervisors call it every few seconds."""
        entries = await self.redis.xrange(keys.OLD_QUEUE, "-", "+", count=1000)
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
        # Only what was read: an older gateway may still be adding to it.
        await self.redis.xdel(keys.OLD_QUEUE, *(entry_id for entry_id, _ in entries))
        return len(entries)

    async def take(self, consumer: str, count: int) -> list[QueueEntry]:
        """Up to ``count`` entries (one round trip): those of dead workers first (looked for
        five times a second), then long-held ones (every few seconds), then queued ones."""
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
        got = cast(list[Any], await queue_lua.QUEUE_TAKE(self.redis, [keys.QUEUE],
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
            got = await queue_lua.QUEUE_TAKE_OVER(self.redis, [keys.QUEUE], args)
            taken += [QueueEntry.of(str(e)) for e in got]
            if len(taken) >= count:
                break
        return taken

    async def _stale(self, consumer: str, count: int) -> list[QueueEntry]:
        cutoff = int(time.time() * 1000) - STALE_HELD_MS
        old = await self.redis.zrangebyscore(f"{keys.QUEUE}:taken", "-inf", cutoff, 0, count)
        if not old:
            return []
        got = await queue_lua.QUEUE_TAKE_OVER(self.redis, [keys.QUEUE],
                              [consumer, int(time.time() * 1000), count, *old])  # fmt: skip
        return [QueueEntry.of(str(e)) for e in got]

    async def peek(self, count: int) -> list[QueueEntry]:
        """About the next ``count`` entries to be taken, left in place."""
        got = await queue_lua.QUEUE_PEEK(self.redis, [keys.QUEUE], [count])
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
            await queue_lua.QUEUE_ACK(self.redis, [keys.QUEUE], list(entry_ids))


@dataclass(frozen=True, slots=True)
class QueueDepth:
    priority: int
    tenant: str
    depth: int
    oldest_age: float  # seconds


async def queue_depths(redis: Any) -> list[QueueDepth]:
    """What waits, by priority and tenant (one round trip)."""
    got = cast(list[Any], await queue_lua.QUEUE_STATE(redis, [keys.QUEUE], []))
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
