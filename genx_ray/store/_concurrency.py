"""Concurrency keys (:class:`genx_ray.model.Concurrency`): at most ``limit`` runs of a workflow
per value of an input field running at once, across every worker.

Each (workflow, key value) has, in one Redis Cluster slot (its own hash tag):

- ``holders``: a sorted set of ``run_id:attempt`` -> when admitted (ms): the runs that count;
- ``waiting``: a sorted set of queue entries -> when first queued (us): runs held back, FIFO.

A worker admits a run before placing it (:meth:`ConcurrencyKeys.admit`): first it recounts the
holders from the runs themselves (a holder that ended, parked in a durable wait, moved to another
attempt, or whose lease is gone no longer counts: a worker or host killed while a run held a
place never leaves the count wrong for longer than that run's lease), then one script adds the
run if there is room, or files its entry under ``waiting`` (it stays ``queued``, holding no host
slot). Every supervisor looks at the keys with waiting runs a few times a second
(:meth:`ConcurrencyKeys.release`): recounts, and moves as many waiting entries as there is room
for back to the run queue, where they were (the worker's admission decides again).
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

from genx_ray.store import _keys as keys
from genx_ray.store import _queue_scripts as queue_lua
from genx_ray.store._queue import QueueEntry, RunQueue

# Hash: key tag -> limit, for every key with waiting runs (the supervisors' work list).
WAITING_KEYS = f"{keys.PREFIX}:conc:waiting"
PENDING_CLAIM_MS = 60_000  # an admitted run not claimed by then (its placing failed) is dropped


def tag(workflow: str, value: str) -> str:
    return "{" + f"{keys.PREFIX}:conc:{keys.part(workflow)}:{value}" + "}"


class ConcurrencyKeys:
    def __init__(self, client: Any, queue: RunQueue | None = None, *, leased: bool = True) -> None:
        """``leased``: runs hold leases (a worker with a Redis URL): a running holder whose
        lease is gone no longer counts. (Without, only its status and attempt say.)"""
        self.redis = client
        self.queue = queue or RunQueue(client)
        self.leased = leased

    async def admit(self, key: str, limit: int, run_id: str, attempt: int,
                    entry: QueueEntry) -> bool:  # fmt: skip
        """Whether the run may start now under its key; if not, its entry waits under the key
        (acknowledge it on the run queue: it is filed here)."""
        await self.recount(key)
        queued = entry.queued_us if entry.queued_us is not None else time.time_ns() // 1000
        args = [f"{run_id}:{attempt}", limit, int(time.time() * 1000), entry.id, queued]
        if await queue_lua.CONC_ADMIT(self.redis, [f"{key}:holders", f"{key}:waiting"], args):
            return True
        await self.redis.hset(WAITING_KEYS, key, limit)
        return False

    async def recount(self, key: str) -> int:
        """Drop the holders that no longer count; returns how many still do."""
        holders = cast(list[Any], await self.redis.zrange(f"{key}:holders", 0, -1,
                                                          withscores=True))  # fmt: skip
        if not holders:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for member, _ in holders:
                run_id = str(member).rpartition(":")[0]
                pipe.hmget(keys.run(run_id), "status", "attempt")
                pipe.exists(keys.lease(run_id))
            found = await pipe.execute()
        now_ms = time.time() * 1000
        gone = []
        for i, (member, admitted) in enumerate(holders):
            (status, attempt), leased = found[2 * i], found[2 * i + 1]
            mine = attempt == str(member).rpartition(":")[2]
            if not mine or status not in ("queued", "running"):
                gone.append(member)  # ended, parked, or moved on to another attempt
            elif status == "running" and self.leased and not leased:
                gone.append(member)  # its host stopped heartbeating
            elif status == "queued" and now_ms - float(admitted) > PENDING_CLAIM_MS:
                gone.append(member)  # admitted, never claimed
        if gone:
            await self.redis.zrem(f"{key}:holders", *gone)
        return len(holders) - len(gone)

    async def release(self) -> int:
        """Move waiting runs that now have room back to the run queue; returns how many."""
        moved = 0
        for key, limit in (await self.redis.hgetall(WAITING_KEYS)).items():
            await self.recount(str(key))
            sets = [f"{key}:holders", f"{key}:waiting"]
            got = cast(list[Any], await queue_lua.CONC_ROOM(self.redis, sets, [int(limit)]))
            waiting, heads = int(got[0]), got[1:]
            entries = [(str(heads[i]), float(heads[i + 1])) for i in range(0, len(heads), 2)]
            for entry, queued_us in entries:
                came = QueueEntry.of(entry)
                await self.queue.put(came.run_id, came.attempt, came.workflow, tenant=came.tenant,
                                     priority=came.priority, queued_at=queued_us / 1e6)  # fmt: skip
            if entries:
                await self.redis.zrem(f"{key}:waiting", *(e for e, _ in entries))
                moved += len(entries)
            if waiting - len(entries) <= 0:
                await self.redis.hdel(WAITING_KEYS, key)
                if await self.redis.zcard(f"{key}:waiting"):  # filed meanwhile: keep looking
                    await self.redis.hset(WAITING_KEYS, key, limit)
        return moved

    async def held(self) -> int:
        """Runs waiting under a concurrency key, in all."""
        total = 0
        for key in await self.redis.hkeys(WAITING_KEYS):
            total += int(await self.redis.zcard(f"{key}:waiting"))
        return total


def input_of(raw: str | None) -> Any:
    return json.loads(raw) if raw else None
