"""The run queue: a Redis stream the gateway appends run ids to, read by workers through one
consumer group, so each queued run is delivered to one worker at a time.

An entry names the run, and usually its attempt and workflow (so a host claims it in one round
trip). It is acknowledged once its run has been claimed (its lease covers it from then on) or handed
back.

Entries a worker took and had not started when it died stay pending under its name. Every
worker looks for such entries twice a second (:meth:`RunQueue.take`): those of a worker whose
heartbeat in the worker table is older than ``dead_after`` (``WORKER_DEAD_SECONDS``, or
``GENX_LEASE_SECONDS`` if shorter) are claimed at once, so a run taken by a dead worker starts
again within the bound a started run's restart has. A live worker keeps its entries, however
slow it is (and if two workers ever start the same entry, the run's attempt fencing lets one
claim it). Entries of a live worker that sat idle ``STALE_PENDING_MS`` (its placement failed,
say) and of a process that never heartbeats are claimed after that long.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from redis.exceptions import ResponseError

from genx_ray.store import _keys as keys
from genx_ray.store._connections import is_cluster, on_node_of

# A pending entry untouched this long is claimed whoever holds it (a worker alive but whose
# placement failed, a process with no heartbeat). Generous on purpose: a dead worker's entries
# are claimed as soon as it is known dead (below); the run's attempt decides who starts it.
STALE_PENDING_MS = 60_000
CLAIM_EVERY_SECONDS = 5.0  # how often a worker looks for such entries
STRANDED_EVERY_SECONDS = 0.5  # how often a worker looks for entries of dead workers
WORKER_DEAD_SECONDS = 3.0  # a worker whose heartbeat is older than this is gone


def worker_alive(
    entry: Mapping[str, Any], now: float, dead_after: float = WORKER_DEAD_SECONDS
) -> bool:
    """Whether a worker table entry heartbeated within ``dead_after`` seconds."""
    return now - float(entry.get("seen", 0)) < dead_after


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
    def __init__(
        self, client: Any, stream: str = keys.QUEUE, *, dead_after: float = WORKER_DEAD_SECONDS
    ) -> None:
        """``dead_after``: seconds after its last heartbeat a worker's taken entries are
        claimed by others."""
        self.redis = client
        self.stream = stream
        self.dead_after = dead_after
        self._claimed_at = 0.0
        self._stranded_at = 0.0

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
        """Up to ``count`` entries: those of dead workers first (looked for twice a second),
        then stale pending ones (every few seconds), then new ones."""
        now = time.monotonic()
        if now - self._stranded_at >= STRANDED_EVERY_SECONDS:
            self._stranded_at = now
            stranded = await self.stranded(consumer, count)
            if stranded:
                return stranded
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

    async def stranded(self, consumer: str, count: int) -> list[QueueEntry]:
        """Claim for ``consumer`` up to ``count`` entries taken by workers whose heartbeat is
        older than ``dead_after`` (two round trips when none is dead, four when one is)."""
        summary = await self._pending_summary()
        others = [str(c["name"]) for c in summary.get("consumers") or ()
                  if str(c["name"]) != consumer and int(c["pending"])]  # fmt: skip
        if not others:
            return []
        now = time.time()
        table = await self.redis.hmget(keys.WORKERS, others)
        dead = [
            name for name, raw in zip(others, table, strict=True)
            if raw is not None and not worker_alive(json.loads(raw), now, self.dead_after)
        ]  # fmt: skip
        claimed: list[QueueEntry] = []
        for name in dead:
            pending = await self.redis.xpending_range(
                self.stream, keys.QUEUE_GROUP, "-", "+", count - len(claimed), consumername=name
            )
            if not pending:
                continue
            ids = [p["message_id"] for p in pending]
            # min idle 1 ms: of two workers claiming at once, the second finds it just claimed.
            got = await self.redis.xclaim(self.stream, keys.QUEUE_GROUP, consumer, 1, ids)
            claimed += [QueueEntry.of(i, f) for i, f in got if f]
            if len(claimed) >= count:
                break
        return claimed

    async def holding(self, workers: list[str]) -> set[str]:
        """Those of these workers that hold queue entries (taken, not yet claimed or handed
        back)."""
        summary = await self._pending_summary()
        names = set(workers)
        return {str(c["name"]) for c in summary.get("consumers") or ()
                if str(c["name"]) in names and int(c["pending"])}  # fmt: skip

    async def _pending_summary(self) -> dict[str, Any]:
        """XPENDING's summary (consumers with entries pending); empty before the first worker
        made the group."""
        try:
            return dict(await self.redis.xpending(self.stream, keys.QUEUE_GROUP))
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return {}

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
