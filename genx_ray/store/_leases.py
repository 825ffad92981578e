"""Heartbeat leases of every run a process executes, renewed together from one thread.

A run's lease is a key with a TTL holding its attempt number (set when the run is claimed, see
:data:`genx_ray.store._scripts.CLAIM`). One thread per process renews every lease it holds in one pipeline
(a round trip per Redis node, however many runs; on a Redis Cluster one pipeline per node, so a
node in a failover holds back only its own runs), every third of the TTL: user code that blocks
the event loop cannot stop the heartbeat. The renewal script refuses once a run has moved to
another attempt or left ``running``, and says when a cancel was requested: the thread tells the
run's owner, which stops it (a zombie of a superseded attempt could write nothing anyway: every
write is fenced).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.cluster
from redis.exceptions import RedisClusterException

from genx_ray.observe import OutageLog
from genx_ray.store import _keys as keys
from genx_ray.store import _scripts as lua
from genx_ray.store._connections import sync_redis

log = logging.getLogger("genx_ray.lease")

# Renewal outcomes of lua.RENEW.
SUPERSEDED, RENEWED, CANCEL_REQUESTED = 0, 1, 2


class Leases:
    """The leases of the runs one process executes. ``on_lost(run_id, attempt)`` and
    ``on_cancel(run_id, attempt)`` are called from the renewer thread."""

    def __init__(
        self,
        redis_url: str,
        ttl: float,
        *,
        on_lost: Callable[[str, int], object],
        on_cancel: Callable[[str, int], object],
    ) -> None:
        self.ttl = ttl
        self.on_lost, self.on_cancel = on_lost, on_cancel
        self._redis = sync_redis(redis_url)
        self._outage = OutageLog("lease renewal", log)
        self._held: dict[str, int] = {}  # run id -> attempt
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="genx-leases", daemon=True)
        self._thread.start()

    @property
    def held(self) -> int:
        return len(self._held)

    def hold(self, run_id: str, attempt: int) -> None:
        """Renew this attempt's lease from now on (it was set when the run was claimed)."""
        with self._lock:
            self._held[run_id] = attempt

    def drop(self, run_id: str, attempt: int) -> None:
        """Stop renewing (the run ended or was handed on); its lease is released separately."""
        with self._lock:
            if self._held.get(run_id) == attempt:
                del self._held[run_id]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._redis.close()

    def renew_all(self) -> dict[str, int]:
        """One round of renewals: run id -> outcome (0 superseded, 1 renewed, 2 cancel asked)."""
        with self._lock:
            held = list(self._held.items())
        if not held:
            return {}
        ttl_ms = int(self.ttl * 1000)
        outcomes: dict[str, int] = {}
        failure: Exception | None = None
        for group in self._by_node(held):
            try:
                results = self._renew(group, ttl_ms)
            except (redis.RedisError, RedisClusterException, OSError) as exc:  # others go on
                failure = exc
                continue
            for (run_id, attempt), result in zip(group, results, strict=True):
                if isinstance(result, redis.exceptions.NoScriptError):
                    result = lua.RENEW.sync(
                        self._redis, [keys.run(run_id), keys.lease(run_id)], [attempt, ttl_ms]
                    )
                if isinstance(result, Exception):
                    log.warning("run %s: lease renewal failed (%s)", run_id, result)
                    continue
                outcomes[run_id] = int(result)
        if failure is not None and not outcomes:
            raise failure
        if failure is not None:
            log.warning("lease renewal failed for some runs (%s); retrying", failure)
        alive = [r for r, outcome in outcomes.items() if outcome != SUPERSEDED]
        if alive:
            self._redis.zadd(keys.LEASES, dict.fromkeys(alive, time.time()))
        for run_id, attempt in held:
            outcome = outcomes.get(run_id)
            if outcome == SUPERSEDED:
                log.warning("run %s attempt %d: superseded; stopping it", run_id, attempt)
                self.drop(run_id, attempt)
                self.on_lost(run_id, attempt)
            elif outcome == CANCEL_REQUESTED:
                self.on_cancel(run_id, attempt)
        return outcomes

    def _by_node(self, held: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
        """The held runs in one group, or on a Redis Cluster one group per node (each renewed
        in a pipeline of its own: a node in a failover holds back only its own runs)."""
        if not isinstance(self._redis, redis.cluster.RedisCluster):
            return [held]
        groups: dict[str, list[tuple[str, int]]] = {}
        for run_id, attempt in held:
            node = self._redis.get_node_from_key(keys.run(run_id))  # type: ignore[no-untyped-call]
            groups.setdefault(node.name, []).append((run_id, attempt))
        return list(groups.values())

    def _renew(self, group: list[tuple[str, int]], ttl_ms: int) -> list[Any]:
        with self._redis.pipeline(transaction=False) as pipe:
            for run_id, attempt in group:
                pipe.execute_command(
                    "EVALSHA", lua.RENEW.sha, 2, keys.run(run_id), keys.lease(run_id), attempt,
                    ttl_ms,
                )  # fmt: skip
            return list(pipe.execute(raise_on_error=False))

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew_all()
            # Keep trying, whatever it was (the leases have slack): a renewer that stopped would
            # let every lease of the process lapse. (A cluster with no node answering raises
            # RedisClusterException, which is no RedisError.)
            except Exception as exc:
                self._outage.failed(exc)
            else:
                self._outage.ok()
