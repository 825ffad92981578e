"""A run host's heartbeat: a lease in Redis, renewed from a thread.

The lease is a key with a TTL holding the attempt number. A thread renews it (user code that
blocks the event loop cannot stop the heartbeat) through a script that refuses once the run has
moved to another attempt or left ``running``: then the host is a zombie and is told to stop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import redis

from genx_ray import keys
from genx_ray.connections import sync_redis

log = logging.getLogger("genx_ray.lease")

# KEYS: run hash, lease. ARGV: attempt, ttl ms. 1 = renewed, 0 = this attempt is superseded.
_RENEW = """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if st[1] ~= 'running' or st[2] ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""


# KEYS: lease. ARGV: attempt. Delete the lease only if this attempt still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    def __init__(
        self,
        redis_url: str,
        run_id: str,
        attempt: int,
        ttl: float,
        on_lost: Callable[[], object],
    ) -> None:
        self.run_id, self.attempt, self.ttl = run_id, attempt, ttl
        self.on_lost = on_lost
        self._redis = sync_redis(redis_url)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{run_id}", daemon=True)

    def start(self) -> None:
        self.renew()
        self._thread.start()

    def renew(self) -> bool:
        ok = bool(
            self._renew(
                keys=[keys.run(self.run_id), keys.lease(self.run_id)],
                args=[self.attempt, int(self.ttl * 1000)],
            )
        )
        if ok:
            self._redis.zadd(keys.LEASES, {self.run_id: time.time()})
        return ok

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    log.warning(
                        "run %s attempt %d: superseded; stopping", self.run_id, self.attempt
                    )
                    self.on_lost()
                    return
            except (redis.RedisError, OSError) as exc:  # keep trying: the lease has slack
                log.warning("run %s: lease renewal failed (%s)", self.run_id, exc)

    def release(self) -> None:
        """Stop heartbeating; the run has ended (or its host is stopping)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        with contextlib.suppress(redis.RedisError, OSError):
            if self._release(keys=[keys.lease(self.run_id)], args=[self.attempt]):
                self._redis.zrem(keys.LEASES, self.run_id)
        self._redis.close()
