"""Heartbeat leases of every run a process executes, renewed together from one thread.

A run's lease is a key with a TTL holding its attempt number (set when the run is claimed, see
:data:`genx_ray.lua.CLAIM`). One thread per process renews every lease it holds in one pipeline
(a round trip per Redis node, however many runs), every third of the TTL: user code that blocks
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

import redis

from genx_ray import keys, lua
from genx_ray.connections import sync_redis

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
        with self._redis.pipeline(transaction=False) as pipe:
            for run_id, attempt in held:
                pipe.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", lua.RENEW.sha, 2, keys.run(run_id), keys.lease(run_id), attempt,
                    ttl_ms,
                )  # fmt: skip
            results = pipe.execute(raise_on_error=False)
        outcomes: dict[str, int] = {}
        for (run_id, attempt), result in zip(held, results, strict=True):
            if isinstance(result, redis.exceptions.NoScriptError):
                result = lua.RENEW.sync(
                    self._redis, [keys.run(run_id), keys.lease(run_id)], [attempt, ttl_ms]
                )
            if isinstance(result, Exception):
                log.warning("run %s: lease renewal failed (%s)", run_id, result)
                continue
            outcomes[run_id] = int(result)
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

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew_all()
            except (redis.RedisError, OSError) as exc:  # keep trying: the leases have slack
                log.warning("lease renewal failed (%s); retrying", exc)
