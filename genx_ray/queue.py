"""The run queue: a Redis stream the gateway appends run ids to, read by workers through one
consumer group, so each queued run is delivered to one worker at a time.

An entry is acknowledged once its run has ended or been handed back. Entries a dead worker had
taken stay pending, and :meth:`RunQueue.take` claims those that sat idle too long.
"""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio
from redis.exceptions import ResponseError

from genx_ray import keys

# A pending entry untouched this long belongs to a worker that died: another worker claims it.
# Generous on purpose: the run's own status and heartbeat decide whether it is really orphaned.
STALE_PENDING_MS = 60_000


class RunQueue:
    def __init__(self, client: redis.asyncio.Redis, stream: str = keys.QUEUE) -> None:
        self.redis = client
        self.stream = stream

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, keys.QUEUE_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def put(self, run_id: str) -> str:
        return str(await self.redis.xadd(self.stream, {"run": run_id}))

    async def take(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, str]]:
        """Up to ``count`` (entry id, run id): stale pending entries first, then new ones."""
        claimed: list[Any] = await self.redis.xautoclaim(
            self.stream, keys.QUEUE_GROUP, consumer, STALE_PENDING_MS, "0-0", count=count
        )
        entries = [(str(i), f["run"]) for i, f in claimed[1] if f]
        if entries:
            return entries
        resp = cast(
            list[Any],
            await self.redis.xreadgroup(
                keys.QUEUE_GROUP, consumer, {self.stream: ">"}, count=count, block=block_ms
            ),
        )
        return [(str(i), f["run"]) for i, f in resp[0][1]] if resp else []

    async def ack(self, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream, keys.QUEUE_GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()
