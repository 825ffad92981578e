"""Redis connections: the one factory for every client genx-ray builds, and which URL it uses.

Which Redis (:func:`resolve_redis_url`):

- ``GENX_REDIS_URL=embedded``: a private Redis started for this process (see
  :mod:`genx_ray.store._embedded`), whoever asks.
- ``GENX_REDIS_URL`` set to a URL: used as given; it must answer, else
  :class:`~genx_ray.model.RedisUnavailable` naming it.
- unset: the default URL (``redis://127.0.0.1:6379/0``) if a Redis answers there. If none does,
  the callers that may make do with a private Redis (``genx dev`` and ``genx demo``,
  ``genx_ray.run``/``start`` from a script or notebook: ``allow_embedded=True``) start one, and
  say so; the others (``genx worker``, ``genx gateway``: ``allow_embedded=False``) fail at start
  with a :class:`~genx_ray.model.ConfigError` naming ``GENX_REDIS_URL`` and the URL tried. A
  worker or gateway on a Redis of its own would keep runs nobody else can see.

The URL chosen is exported as ``GENX_REDIS_URL``, so every process started afterwards (Ray
workers, a gateway) uses the same one.

Single Redis or Redis Cluster: detected when a URL is first used in a process (``INFO cluster``
says ``cluster_enabled:1``), never configured: a URL of any node of a cluster gives cluster
clients (:class:`redis.asyncio.cluster.RedisCluster`, :class:`redis.cluster.RedisCluster`), which
route each command by its key's slot and follow the cluster through failovers. What must stay
true for that to work: every multi-key command and Lua script touches one slot (the keys of a run
share the hash tag ``{run_id}``, see :mod:`genx_ray.store.keys`); code that reads many keys of
different slots at once splits by slot where :func:`is_cluster` says so.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any
from urllib.parse import urlparse

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster

from genx_ray.model import EMBEDDED, ConfigError, RedisUnavailable, Settings
from genx_ray.store._embedded import EmbeddedRedis

log = logging.getLogger("genx_ray")

# What the factories return: a client of a single Redis, or of a Redis Cluster. They share the
# command methods (and pipelines) genx-ray uses.
AsyncRedis = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
SyncRedis = redis.Redis | redis.cluster.RedisCluster

_lock = threading.Lock()
_embedded: EmbeddedRedis | None = None  # owned by this process, stopped at exit
_topology: dict[str, bool] = {}  # URL -> whether it is a node of a Redis Cluster

# How long a first connection may take to answer which kind of Redis a URL is (a process
# starting while Redis restarts waits this long, then fails naming the URL).
PROBE_SECONDS = 5.0


def ping(url: str, timeout: float = 1.0) -> str | None:
    """None when Redis answers at ``url``, else why not. (Learns whether it is a cluster, too.)"""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
        _remember(url, _cluster_enabled(client))
        return None
    except (redis.RedisError, OSError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        client.close()


def resolve_redis_url(settings: Settings | None = None, *, allow_embedded: bool = True) -> str:
    """The Redis URL this process should use (see the module's docstring for the rules).

    ``allow_embedded``: with ``GENX_REDIS_URL`` unset and nothing answering at the default URL,
    start a private Redis (a script, a notebook, ``genx dev``) instead of failing (``genx
    worker``, ``genx gateway``).
    """
    settings = settings or Settings.current()
    if settings.redis_url == EMBEDDED:
        return _start_embedded(reason="GENX_REDIS_URL=embedded")
    reason = ping(settings.redis_url)
    if reason is None:
        return settings.redis_url
    if settings.redis_url_explicit:
        raise RedisUnavailable(settings.redis_url, f"{reason} (the URL GENX_REDIS_URL names)")
    if not allow_embedded:
        raise ConfigError(
            "GENX_REDIS_URL",
            f"not set, and no Redis answers at the default {settings.redis_url} ({reason}). "
            "Set it to your Redis (or any node of your Redis Cluster); a worker and a gateway "
            "must share one. For a private Redis on this machine: GENX_REDIS_URL=embedded, or "
            "`genx dev`.",
        )
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
        _topology[_embedded.url] = False
        return _embedded.url


# -- single Redis or Redis Cluster -----------------------------------------------------------------


def _cluster_enabled(client: redis.Redis) -> bool:
    try:
        return bool(int(client.info("cluster").get("cluster_enabled", 0)))
    except redis.ResponseError:  # INFO renamed or denied (some managed Redis): ask the cluster
        try:
            client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        except redis.ResponseError:  # "cluster support disabled", or denied: not a cluster
            return False
        return True


def _remember(url: str, cluster: bool) -> None:
    with _lock:
        _topology[url] = cluster


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` is a node of a Redis Cluster: asked once per URL and process. Raises
    :class:`RedisUnavailable` if nothing answers there within ``PROBE_SECONDS``."""
    known = _topology.get(url)
    if known is not None:
        return known
    deadline = time.monotonic() + PROBE_SECONDS
    while True:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            cluster = _cluster_enabled(client)
            break
        except (redis.RedisError, OSError) as exc:
            if time.monotonic() > deadline:
                raise RedisUnavailable(url, str(exc) or type(exc).__name__) from None
            time.sleep(0.1)
        finally:
            client.close()
    _remember(url, cluster)
    return cluster


def _cluster_node(url: str) -> bool:
    """:func:`is_cluster_url`, refusing a cluster URL that names another database than 0."""
    cluster = is_cluster_url(url)
    if cluster and urlparse(url).path.strip("/") not in ("", "0"):
        raise ConfigError(
            "GENX_REDIS_URL", f"{url} is a Redis Cluster node: a cluster has database 0 only"
        )
    return cluster


def is_cluster(client: object) -> bool:
    """Whether a client talks to a Redis Cluster (some commands go per slot there)."""
    return isinstance(client, redis.asyncio.cluster.RedisCluster | redis.cluster.RedisCluster)


async def on_node_of(client: redis.asyncio.cluster.RedisCluster, key: str, *command: Any) -> Any:
    """``command`` (a stream read of ``key``), sent to the node that holds ``key``. Left to
    itself, a cluster client asks its default node which keys an XREAD or XREADGROUP names
    (COMMAND GETKEYS), and once a failover took that node away, every such read fails, for good
    (seen: redis-py then raises AttributeError from a connection it never reopens)."""
    await client.initialize()  # a no-op unless a failure asked for a new slot map
    node = client.get_node_from_key(key)
    return await client.execute_command(*command, target_nodes=node)


# -- the factories -------------------------------------------------------------------------------

# Connections one async client opens at most. Past that, callers wait for a free one (up to
# POOL_WAIT_SECONDS) instead of failing: a burst of 200 SSE replays must queue, not error.
POOL_SIZE = 64
POOL_WAIT_SECONDS = 20
# A cluster client's connections per node, at most. redis-py's async cluster client does not
# queue for a connection (it raises MaxConnectionsError at the cap), so this is a ceiling
# against a runaway, sized so a burst of commands to one node never meets it.
CLUSTER_CONNECTIONS_PER_NODE = 1024


def async_redis(url: str, *, pool_size: int = POOL_SIZE, decode: bool = True) -> AsyncRedis:
    """An asyncio client (a cluster client for a Redis Cluster node); close it with ``await
    client.aclose()``. ``decode=False``: replies stay bytes (for code that only passes them
    on). A single Redis's client has a bounded pool of ``pool_size`` connections that callers
    wait for."""
    if _cluster_node(url):
        return redis.asyncio.cluster.RedisCluster.from_url(
            url,
            decode_responses=decode,
            max_connections=max(pool_size, CLUSTER_CONNECTIONS_PER_NODE),
            socket_keepalive=True,
            health_check_interval=30,
        )
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=POOL_WAIT_SECONDS,
        decode_responses=decode,
        socket_keepalive=True,
        health_check_interval=30,
    )
    return redis.asyncio.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def sync_redis(url: str, *, decode: bool = True) -> SyncRedis:
    """A blocking client (a cluster client for a Redis Cluster node); ``close()`` it."""
    if _cluster_node(url):
        return redis.cluster.RedisCluster.from_url(
            url, decode_responses=decode, socket_keepalive=True, health_check_interval=30
        )
    return redis.Redis.from_url(
        url, decode_responses=decode, socket_keepalive=True, health_check_interval=30
    )
