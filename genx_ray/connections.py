"""Redis connections: one factory for async and sync clients, and the embedded fallback.

Resolution (:func:`resolve_redis_url`): an explicit ``GENX_REDIS_URL`` is used as given and must
answer; with nothing set, the default URL is tried and, where nothing answers there, a private
Redis is started for this process (see :mod:`genx_ray.embedded`). The URL chosen is exported as
``GENX_REDIS_URL`` so every process started afterwards (Ray workers, a gateway) uses the same one.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading

import redis
import redis.asyncio

from genx_ray.embedded import EmbeddedRedis
from genx_ray.errors import RedisUnavailable
from genx_ray.settings import EMBEDDED, Settings

log = logging.getLogger("genx_ray")

AsyncRedis = redis.asyncio.Redis
SyncRedis = redis.Redis

_lock = threading.Lock()
_embedded: EmbeddedRedis | None = None  # owned by this process, stopped at exit


def ping(url: str, timeout: float = 1.0) -> str | None:
    """None when Redis answers at ``url``, else why not."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
        return None
    except (redis.RedisError, OSError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        client.close()


def resolve_redis_url(settings: Settings | None = None) -> str:
    """The Redis URL this process should use, starting an embedded Redis if that is the rule."""
    settings = settings or Settings.current()
    if settings.redis_url == EMBEDDED:
        return _start_embedded(reason="GENX_REDIS_URL=embedded")
    reason = ping(settings.redis_url)
    if reason is None:
        return settings.redis_url
    if settings.redis_url_explicit:
        raise RedisUnavailable(settings.redis_url, reason)
    return _start_embedded(reason=f"nothing answers at {settings.redis_url}")


def _start_embedded(reason: str) -> str:
    global _embedded
    with _lock:
        if _embedded is None:
            server = EmbeddedRedis()
            server.start()
            atexit.register(server.stop)
            _embedded = server
            log.warning(
                "genx: %s; started a private Redis at %s (it stops with this process)",
                reason,
                server.url,
            )
        os.environ["GENX_REDIS_URL"] = _embedded.url
        return _embedded.url


# Connections one async client opens at most. Past that, callers wait for a free one (up to
# POOL_WAIT_SECONDS) instead of failing: a burst of 200 SSE replays must queue, not error.
POOL_SIZE = 64
POOL_WAIT_SECONDS = 20


def async_redis(
    url: str, *, pool_size: int = POOL_SIZE, decode: bool = True
) -> redis.asyncio.Redis:
    """An asyncio client over a bounded, blocking pool; close it with ``await client.aclose()``.
    ``decode=False``: replies stay bytes (for code that only passes them on)."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=POOL_WAIT_SECONDS,
        decode_responses=decode,
        socket_keepalive=True,
        health_check_interval=30,
    )
    return redis.asyncio.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def is_cluster(client: object) -> bool:
    """Whether a client talks to a Redis Cluster (some commands go per slot there)."""
    return type(client).__name__ == "RedisCluster"


def sync_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, decode_responses=True, socket_keepalive=True, health_check_interval=30
    )
