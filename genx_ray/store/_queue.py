"""The run queue: a Redis stream the gateway appends run ids to, read by workers through one
consumer group, so each queued run is delivered to one worker at a time.

An entry names the run, and usually its attempt and workflow (so a host claims it in one round
trip). It is acknowledged once its run has ended or been handed back. Entries a dead worker had
taken stay pending, and :meth:`RunQueue.take` claims those that sat idle too long.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from redis.exceptions import ResponseError

from genx_ray.store import _keys as keys
from genx_ray.store._connections import is_cluster, on_node_of

# A pending entry untouched this long belongs to a worker that died: another worker claims it.
# Generous on purpose: the run's own status and heartbeat decide whether it is really orphaned.
STALE_PENDING_MS = 60_000
CLAIM_EVERY_SECONDS = 5.0  # how often a worker looks for such entries


@dataclass(frozen=True, slots=True)
class QueueEntry:
    id: str  # the stream entry's id, to acknowledge
    run_id: str
    attempt: int | None = None
    workflow: str | None = None

    @classmethod
    def of(cls, entry_id: str, fields: dict[str, str]) -> QueueEntry:
        attempt = fields.get("attempt")
        return cls(str(entry_id), fields["run"], int(attempt) if attempt else None,
                   fields.get("workflow"))  # fmt: skip


class RunQueue:
    def __init__(self, client: Any, stream: str = keys.QUEUE) -> None:
        self.redis = client
        self.stream = stream
        self._claimed_at = 0.0

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, keys.QUEUE_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def put(self, run_id: str, attempt: int | None = None) -> str:
        fields = {"run": run_id} if attempt is None else {"run": run_id, "attempt": str(attempt)}
        return str(await self.redis.xadd(self.stream, fields))

    async def take(self, consumer: str, count: int, block_ms: int) -> list[QueueEntry]:
        """Up to ``count`` entries: stale pending ones first (looked for every few seconds), then
        new ones."""
        now = time.monotonic()
        if now - self._claimed_at >= CLAIM_EVERY_SECONDS:
            claimed: list[Any] = await self.redis.xautoclaim(
                self.stream, keys.QUEUE_GROUP, consumer, STALE_PENDING_MS, "0-0", count=count
            )
            entries = [QueueEntry.of(i, f) for i, f in claimed[1] if f]
            if entries:
                return entries  # there may be more: look again next time
            self._claimed_at = now
        if is_cluster(self.redis):
            resp = await on_node_of(
                self.redis, self.stream, "XREADGROUP", "GROUP", keys.QUEUE_GROUP, consumer,
                "COUNT", count, "BLOCK", block_ms, "STREAMS", self.stream, ">",
            )  # fmt: skip
        else:
            resp = await self.redis.xreadgroup(
                keys.QUEUE_GROUP, consumer, {self.stream: ">"}, count=count, block=block_ms
            )
        resp = cast(list[Any], resp)
        return [QueueEntry.of(i, f) for i, f in resp[0][1]] if resp else []

    async def ack(self, *entry_ids: str) -> None:
        if not entry_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream, keys.QUEUE_GROUP, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            await pipe.execute()


async def queue_state(redis: Any) -> tuple[int, float]:
    """The run queue's depth and the age of its oldest entry (seconds; its id is when it was
    added, on Redis's clock), read now."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.QUEUE)
        pipe.xrange(keys.QUEUE, "-", "+", count=1)
        depth, first = await pipe.execute()
    if not first:
        return int(depth), 0.0
    entry_id = first[0][0]
    entry_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    added = int(entry_id.partition("-")[0])
    return int(depth), max(0.0, time.time() - added / 1000)
