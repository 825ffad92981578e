"""The store: everything genx-ray keeps, in Redis, and the only room that talks to it.

Connections (a single Redis or a Redis Cluster, or a private embedded one), every key name
(:mod:`keys`), every Lua script (:mod:`scripts`), and one class per kind of record: runs and
their status changes, event streams, the batched fenced writer of a run host, leases, the run
queue, tenant quotas, schedules. Keys of one run share one hash tag, so every script touching a
run stays within one slot of a Redis Cluster.
"""

from genx_ray.store import _connections as connections
from genx_ray.store import _keys as keys
from genx_ray.store import _scripts as scripts
from genx_ray.store._cluster import cluster_state
from genx_ray.store._concurrency import ConcurrencyKeys
from genx_ray.store._concurrency import tag as concurrency_key
from genx_ray.store._connections import (
    AsyncRedis,
    SyncRedis,
    async_redis,
    is_cluster,
    is_cluster_url,
    on_node_of,
    ping,
    resolve_redis_url,
    sync_redis,
)
from genx_ray.store._embedded import EmbeddedRedis, die_with_parent, find_redis_server, free_port
from genx_ray.store._leases import Leases
from genx_ray.store._outbox import notify
from genx_ray.store._queue import (
    WORKER_DEAD_SECONDS,
    QueueDepth,
    QueueEntry,
    RunQueue,
    queue_depths,
    queue_gauges,
    queue_state,
    worker_alive,
)
from genx_ray.store._quotas import Quotas
from genx_ray.store._runs import MAX_DELAY_SECONDS, Claim, RunStore, check_input, start_time
from genx_ray.store._schedules import (
    Schedule,
    ScheduleNotFound,
    ScheduleStore,
    Skipped,
    check,
    latest_tick,
    next_tick,
)
from genx_ray.store._search import RunFilter, backfill_status_indexes, time_prefix
from genx_ray.store._streams import (
    MAX_BLOCK_MS,
    START,
    EventStore,
    ResumePoint,
    StreamEntry,
    before,
    check_event_id,
    follow_sync,
    id_key,
    parse_entries,
    resume_point,
    trimmed_past,
)
from genx_ray.store._writer import BatchWriter, RunWriter

__all__ = [
    "MAX_BLOCK_MS",
    "MAX_DELAY_SECONDS",
    "START",
    "WORKER_DEAD_SECONDS",
    "AsyncRedis",
    "BatchWriter",
    "Claim",
    "ConcurrencyKeys",
    "EmbeddedRedis",
    "EventStore",
    "Leases",
    "QueueDepth",
    "QueueEntry",
    "Quotas",
    "ResumePoint",
    "RunFilter",
    "RunQueue",
    "RunStore",
    "RunWriter",
    "Schedule",
    "ScheduleNotFound",
    "ScheduleStore",
    "Skipped",
    "StreamEntry",
    "SyncRedis",
    "async_redis",
    "backfill_status_indexes",
    "before",
    "check",
    "check_event_id",
    "check_input",
    "cluster_state",
    "concurrency_key",
    "connections",
    "die_with_parent",
    "find_redis_server",
    "follow_sync",
    "free_port",
    "id_key",
    "is_cluster",
    "is_cluster_url",
    "keys",
    "latest_tick",
    "next_tick",
    "notify",
    "on_node_of",
    "parse_entries",
    "ping",
    "queue_depths",
    "queue_gauges",
    "queue_state",
    "resolve_redis_url",
    "resume_point",
    "scripts",
    "start_time",
    "sync_redis",
    "time_prefix",
    "trimmed_past",
    "worker_alive",
]
