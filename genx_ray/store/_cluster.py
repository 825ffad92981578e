"""The cluster as Redis sees it, for operators (``GET /v1/cluster``, the console's cluster page):
the workers and their run hosts, the run queue, the runs holding a lease, and the LLM budgets in
use against their limits.

Everything is read from what the processes already write: the worker table (each worker's
heartbeat, twice a second, with its run hosts), the run queue (:func:`queue_state`: whatever
the queue becomes, this is the one function to change), the lease set, and each budget's keys
(``keys.llm_budget``). Nothing here asks a process; a worker that stopped writing is shown as
not alive until the supervisor removes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from genx_ray.model import LLMLimit
from genx_ray.store import _keys as keys
from genx_ray.store._queue import queue_state, worker_alive


async def cluster_state(redis: Any, llm_limits: Mapping[str, LLMLimit]) -> dict[str, Any]:
    """``{"workers", "queue", "leases", "llm_budgets"}`` as the API returns them."""
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.WORKERS)
        pipe.zcard(keys.LEASES)
        table, leased = await pipe.execute()
    depth, oldest = await queue_state(redis)
    workers = [_worker(str(name), json.loads(raw), now) for name, raw in sorted(table.items())]
    budgets = [await _budget(redis, glob, limit) for glob, limit in sorted(llm_limits.items())]
    return {
        "workers": workers,
        "queue": {"depth": depth, "oldest_age_seconds": round(oldest, 3)},
        "leases": int(leased),
        "llm_budgets": budgets,
    }


def _worker(name: str, entry: dict[str, Any], now: float) -> dict[str, Any]:
    def age(started: Any) -> float | None:
        return round(now - float(started), 1) if started else None

    hosts = [
        {"name": str(h.get("name", "")), "runs": int(h.get("runs", 0)),
         "age_seconds": age(h.get("started")), "up": bool(h.get("up")),
         "healthy": bool(h.get("healthy"))}
        for h in entry.get("run_hosts") or []
    ]  # fmt: skip
    return {
        "name": name,
        "deployment": str(entry.get("version", "")),
        "alive": worker_alive(entry, now),
        "draining": bool(entry.get("draining")),
        "seen_seconds_ago": round(now - float(entry.get("seen", 0)), 1),
        "age_seconds": age(entry.get("started")),
        "hosts": str(entry.get("hosts", "")),
        "runs": int(entry.get("runs", 0)),
        "run_hosts": hosts,
    }


async def _budget(redis: Any, glob: str, limit: LLMLimit) -> dict[str, Any]:
    """One budget's use now: concurrency slots held, requests and tokens of the last minute,
    a ``Retry-After`` pause in force, processes with callers waiting."""
    k = keys.llm_budget(glob)
    now_ms = int(time.time() * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(k.concurrency, now_ms, "+inf")
        pipe.zcount(k.requests, now_ms - 60_000, "+inf")
        pipe.zrangebyscore(k.tokens, now_ms - 60_000, "+inf")
        pipe.pttl(k.pause)
        pipe.zcount(k.waiting, now_ms, "+inf")
        held, requests, tokens, pause_ms, waiting = await pipe.execute()
    used_tokens = sum(int(str(m).rpartition(":")[2] or 0) for m in tokens)
    return {
        "model": glob,
        "concurrency": {"used": int(held), "limit": limit.concurrency},
        "requests_per_minute": {"used": int(requests), "limit": limit.rpm},
        "tokens_per_minute": {"used": used_tokens, "limit": limit.tpm},
        "paused_seconds": round(max(0, int(pause_ms)) / 1000, 3),
        "processes_waiting": int(waiting),
    }
