"""Finding a tenant's runs by workflow, status, tags and creation time, from indexes.

Every filter has an index, a sorted set of run ids (all scores 0, so ordered by id, and ids sort
by creation time): the tenant's runs, by workflow (``keys.run_index``), by tag
(``keys.tag_index``: tags never change, written at creation) and by status
(``keys.status_index``). A time range is a range of ids, so it needs no index of its own. A
search walks the smallest index within the range, newest first, and keeps the ids every other
index holds too (``ZMSCORE``, one command per index per page of ids), then reads the records of
those it returns: the cost follows the smallest index, never the tenant's whole history. The
keys live in different slots of a Redis Cluster; nothing here needs them in one (no
``ZINTERSTORE``), a cluster client sends each command to its node.

Statuses change, and a run's status is written by scripts that touch only the run's own slot,
so the status indexes cannot be updated in the same script. They are kept so that they never
miss a run: a run is in its tenant's ``open`` index from creation, and goes into the index of
its terminal status (succeeded, failed, cancelled) just before that status is written (the run
writer, cancel, the supervisor's reap). An index may therefore hold a run that is not (or not
yet) in its status: every record read is checked against the filter again (the index decides
nothing alone), and entries found wrong are removed as they are met (a terminal status never
changes again). A filter on a live status (queued, scheduled, running, waiting) walks the open
index: the runs that have not ended, the working set, which stays small however long the
history grows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from genx_ray.model import DEFAULT_TENANT, RUN_PREFIX, Run, RunStatus, new_run_id
from genx_ray.store import _keys as keys

PAGE = 500  # ids read from the walked index at once
_TIME_CHARS = len(RUN_PREFIX) + 10  # "run_" + the 48-bit ms timestamp in base32
_LAST_MS = 2**48 - 1


@dataclass(frozen=True, slots=True)
class RunFilter:
    """What a search keeps: every field given must hold (tags: each one)."""

    workflow: str | None = None
    status: RunStatus | None = None
    tags: tuple[tuple[str, str], ...] = ()
    created_after: float | None = None  # unix seconds, included
    created_before: float | None = None  # unix seconds, excluded

    def indexes(self, tenant: str) -> list[str]:
        """The index of each filter given; the tenant's (or the workflow's) first."""
        out = [keys.run_index(tenant, self.workflow)]
        out += [keys.tag_index(tenant, k, v) for k, v in self.tags]
        if self.status is not None:
            name = self.status.value if self.status.terminal else keys.OPEN
            out.append(keys.status_index(tenant, name))
        return out

    def bounds(self, cursor: str | None = None) -> tuple[str, str]:
        """The id range (ZRANGEBYLEX bounds, low and high) of the times given, below ``cursor``."""
        low = "-" if self.created_after is None else "[" + time_prefix(self.created_after)
        high = "+" if self.created_before is None else "(" + time_prefix(self.created_before)
        if cursor is not None and (high == "+" or cursor < high[1:]):
            high = "(" + cursor
        return low, high

    def keeps(self, h: dict[str, str], tenant: str) -> bool:
        """Whether a run's record fits (its id, hence its time, fits already)."""
        if h.get("tenant", DEFAULT_TENANT) != tenant:
            return False
        if self.workflow is not None and h.get("workflow") != self.workflow:
            return False
        if self.status is not None and h.get("status") != self.status.value:
            return False
        if self.tags:
            tags = json.loads(h["tags"]) if h.get("tags") else {}
            return all(tags.get(k) == v for k, v in self.tags)
        return True


def time_prefix(ts: float) -> str:
    """The start of every run id created at ``ts`` (unix seconds, to the millisecond; a time
    before 1970 or past the ids' range is taken as their first or last)."""
    return new_run_id(min(max(ts, 0.0), _LAST_MS / 1000))[:_TIME_CHARS]


async def search(
    redis: Any,
    tenant: str,
    f: RunFilter,
    *,
    limit: int,
    cursor: str | None = None,
    max_scan: int = 20_000,
) -> tuple[list[Run], str | None]:
    """The tenant's runs that fit ``f``, newest first: a page of at most ``limit``, and the
    cursor of the next one (None at the end). At most ``max_scan`` ids of the walked index are
    looked at per call: a page can come back short, with a cursor to go on from."""
    indexes = f.indexes(tenant)
    low, high = f.bounds(cursor)
    walked, others = await _smallest(redis, indexes, low, high)
    page: list[Run] = []
    scanned = 0
    while scanned < max_scan:
        ids = cast(list[str], await redis.zrevrangebylex(walked, high, low, start=0, num=PAGE))
        if not ids:
            return page, None
        scanned += len(ids)
        kept = await _in_all(redis, others, ids)
        at = 0
        while at < len(kept):
            chunk = kept[at : at + max(16, (limit - len(page)) + 8)]
            at += len(chunk)
            for run_id, h in zip(chunk, await _records(redis, chunk), strict=True):
                if not await _check(redis, tenant, f, indexes, run_id, h):
                    continue
                page.append(Run.from_hash(h))
                if len(page) == limit:
                    return page, run_id
        if len(ids) < PAGE:
            return page, None
        high = "(" + ids[-1]
    return page, high[1:]


async def count(
    redis: Any, tenant: str, f: RunFilter, *, cap: int = 10_000
) -> tuple[dict[str, int], bool]:
    """How many of the tenant's runs that fit ``f`` (its status aside) are in each status, and
    whether that is all of them (False: more than ``cap`` runs fit; these are the newest)."""
    f = RunFilter(f.workflow, None, f.tags, f.created_after, f.created_before)
    indexes = f.indexes(tenant)
    low, high = f.bounds()
    walked, others = await _smallest(redis, indexes, low, high)
    counts = {s.value: 0 for s in RunStatus}
    seen = 0
    while seen < cap:
        num = min(PAGE, cap - seen)
        ids = cast(list[str], await redis.zrevrangebylex(walked, high, low, start=0, num=num))
        if not ids:
            return counts, True
        kept = await _in_all(redis, others, ids)
        async with redis.pipeline(transaction=False) as pipe:
            for run_id in kept:
                pipe.hmget(keys.run(run_id), "status", "tenant")
            found = await pipe.execute()
        for status, owner in found:
            if status in counts and (owner or DEFAULT_TENANT) == tenant:
                counts[status] += 1
        seen += len(ids)
        if len(ids) < num:
            return counts, True
        high = "(" + ids[-1]
    more = await redis.zrevrangebylex(walked, high, low, start=0, num=1)
    return counts, not more


async def _smallest(
    redis: Any, indexes: Sequence[str], low: str, high: str
) -> tuple[str, list[str]]:
    """The index with the fewest ids in the range (to walk), and the others (to check)."""
    if len(indexes) == 1:
        return indexes[0], []
    async with redis.pipeline(transaction=False) as pipe:
        for index in indexes:
            pipe.zlexcount(index, low, high)
        sizes = await pipe.execute()
    walked = min(range(len(indexes)), key=lambda i: int(sizes[i]))
    return indexes[walked], [k for i, k in enumerate(indexes) if i != walked]


async def _in_all(redis: Any, others: Sequence[str], ids: list[str]) -> list[str]:
    """The ids every one of ``others`` holds, in order."""
    if not others or not ids:
        return ids
    async with redis.pipeline(transaction=False) as pipe:
        for index in others:
            pipe.zmscore(index, ids)
        scores = await pipe.execute()
    return [run_id for i, run_id in enumerate(ids) if all(s[i] is not None for s in scores)]


async def _records(redis: Any, run_ids: Sequence[str]) -> list[dict[str, str]]:
    async with redis.pipeline(transaction=False) as pipe:
        for run_id in run_ids:
            pipe.hgetall(keys.run(run_id))
        return cast(list[dict[str, str]], await pipe.execute())


async def _check(
    redis: Any, tenant: str, f: RunFilter, indexes: list[str], run_id: str, h: dict[str, str]
) -> bool:
    """Whether the record fits; an index entry met that is wrong for good is removed: a run
    that expired (from every index walked), a run that ended in another status (from the status
    index walked, which may be the open one)."""
    if not h:
        async with redis.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.zrem(index, run_id)
            await pipe.execute()
        return False
    if f.keeps(h, tenant):
        return True
    try:
        status = RunStatus(h.get("status", ""))
    except ValueError:
        return False
    if f.status is not None and status.terminal and status is not f.status:
        await redis.zrem(indexes[-1], run_id)  # the status index walked is the last one
    return False


async def find_all(
    redis: Any, tenant: str, f: RunFilter, *, limit: int, ids: Sequence[str] | None = None
) -> list[Run]:
    """Every run of the tenant that fits ``f``, newest first, at most ``limit`` (a bulk
    action's). With ``ids``, only among those runs (the filter still applies)."""
    if ids is not None:
        wanted = sorted(set(ids), reverse=True)
        low, high = f.bounds()
        inside = [
            i for i in wanted
            if (low == "-" or i >= low[1:]) and (high == "+" or i < high[1:])
        ]  # fmt: skip
        records = await _records(redis, inside)
        return [Run.from_hash(h) for h in records if h and f.keeps(h, tenant)][:limit]
    out: list[Run] = []
    cursor: str | None = None
    while len(out) < limit:
        page, cursor = await search(
            redis, tenant, f, limit=min(500, limit - len(out)), cursor=cursor
        )
        out += page
        if cursor is None:
            break
    return out


async def backfill_status_indexes(redis: Any, *, batch: int = 500) -> int:
    """Add the runs indexed before the status indexes existed (an upgrade) to them, once: every
    run of every tenant's index, by the status its record has now (a run ending meanwhile is
    indexed by its writer too). Returns how many runs were looked at (0 once done before)."""
    if await redis.get(keys.STATUS_INDEXES_FILLED):
        return 0
    seen = 0
    for index in cast(list[str], await redis.zrange(keys.INDEXES, 0, -1)):
        tenant = keys.tenant_of_index(index)
        if tenant is None:
            continue
        low = "-"
        while True:
            ids = cast(list[str], await redis.zrangebylex(index, low, "+", start=0, num=batch))
            if not ids:
                break
            async with redis.pipeline(transaction=False) as pipe:
                for run_id in ids:
                    pipe.hget(keys.run(run_id), "status")
                statuses = await pipe.execute()
            by_index: dict[str, dict[str, int]] = {}
            for run_id, status in zip(ids, statuses, strict=True):
                if status is None:
                    continue  # expired: the supervisor trims it
                name = status if status in ("succeeded", "failed", "cancelled") else keys.OPEN
                by_index.setdefault(keys.status_index(tenant, name), {})[run_id] = 0
            if by_index:
                async with redis.pipeline(transaction=False) as pipe:
                    for key, members in by_index.items():
                        pipe.zadd(key, members)
                    pipe.zadd(keys.INDEXES, dict.fromkeys(keys.status_indexes(tenant), 0))
                    await pipe.execute()
            seen += len(ids)
            low = "(" + ids[-1]
    await redis.set(keys.STATUS_INDEXES_FILLED, "1")
    return seen
