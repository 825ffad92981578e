"""Every Redis key genx-ray uses, in one place: the data model at a glance.

Keys of one run share the hash tag ``{run_id}``, so they live in one Redis Cluster slot and the
Lua scripts that touch several of them (status + event, journal + event, lease + status) stay
valid there. An LLM budget's keys share a tag of their own for the same reason. Every other key
is touched alone, or in pipelines that a cluster client splits by slot.

Names that come from users (tenants, workflows, idempotency keys) are escaped with :func:`part`,
so no two different tuples of names can build the same key, and none can smuggle in a hash tag.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import quote, unquote

PREFIX = "genx"

# The run queue's keys all start with this (its hash tag: one Redis Cluster slot, so one script
# takes a batch of runs): per priority and tenant a FIFO of entries, per priority the tenants in
# turn, the entries taken and by whom (genx_ray.store._queue).
QUEUE = "{" + f"{PREFIX}:queue" + "}"
# Stream: where the run queue was before priorities (read once by a worker, and moved over).
OLD_QUEUE = f"{PREFIX}:queue"

# Sorted set: run id -> last lease renewal (unix seconds) of every run a host holds a lease on.
# The supervisor reads its stale end; the run's lease key decides whether the run is orphaned.
LEASES = f"{PREFIX}:leases"

# Hash: worker name -> JSON {version, draining, seen, hosts}: the live workers, their deployment.
WORKERS = f"{PREFIX}:workers"

# Stream: control signals for running runs (cancel requested), read by every run host from its
# tail, so a cancel reaches a run among thousands without polling each one. Capped: a host that
# misses a signal still finds the flag at its next lease renewal.
SIGNALS = f"{PREFIX}:signals"
SIGNALS_MAXLEN = 10_000

# Stream: runs that ended and whose webhook is still to be delivered (an outbox: a host that dies
# right after finishing cannot lose the notification).
WEBHOOKS = f"{PREFIX}:webhooks"
WEBHOOK_GROUP = "senders"

# Sorted set: run index keys (members) -> 0: by tenant, workflow, tag and status. The
# supervisor walks it to trim expired runs.
INDEXES = f"{PREFIX}:indexes"

# Sorted set: run id -> when something is due for it (unix seconds): a scheduled run's start, a
# sleeping run's wake-up, an input's deadline, a child's next check. Read by the timer service of
# every supervisor; what is due is done by a script that checks the run first (exactly once).
TIMERS = f"{PREFIX}:timers"

# Hash: schedule id -> JSON {tenant, workflow, cron, timezone, input, created_at, overlap,
# last_run_id, last_skipped, disabled}. Every schedule key shares one slot: this key's name is
# the hash tag of the others ({genx:schedules}), so one script creates a schedule under its
# tenant's cap, and one lists a page of them (records and due times): one round trip.
SCHEDULES = f"{PREFIX}:schedules"
_SCHEDULES_TAG = "{" + SCHEDULES + "}"
# Sorted set: schedule id -> its next due time (unix seconds); advanced by compare-and-set.
SCHEDULES_DUE = f"{_SCHEDULES_TAG}:due"
# Where the due set and the tenants' indexes were before they shared the records' slot (read
# once by the migration, genx_ray.store._schedules.migrate).
OLD_SCHEDULES_DUE = f"{PREFIX}:schedules:due"

# String: the secret run tokens (browser-safe, read-only, one run each) are signed with, when
# GENX_TOKEN_SECRET is not set. Created once (SET NX) by the first gateway and never expired, so
# every gateway on this Redis, and a restarted one, accepts the tokens any of them minted.
TOKEN_SECRET = f"{PREFIX}:token-secret"

# What a stream entry of a run's events holds: the event type apart (readers that pass the event
# through, such as the gateway's SSE, need no JSON parsing) and the event as JSON.
TYPE_FIELD = "t"
EVENT_FIELD = "e"


def part(name: str) -> str:
    """A user-supplied name made safe for a key: characters outside ``[A-Za-z0-9_.-]``
    percent-encoded (``:``, ``{``, ``}``, ``%`` included). Injective, and readable for the
    names people actually use."""
    return quote(name, safe="-_.~")


def unpart(name: str) -> str:
    """The name :func:`part` made safe."""
    return unquote(name)


def run(run_id: str) -> str:
    """Hash: the run record (status, input, output, attempt, timestamps...)."""
    return f"{PREFIX}:run:{{{run_id}}}"


def events(run_id: str) -> str:
    """Stream: the run's events; entry ids are the SSE event ids."""
    return f"{PREFIX}:run:{{{run_id}}}:events"


def journal(run_id: str) -> str:
    """Hash: step id -> recorded outcome, so a restarted run does not redo completed steps."""
    return f"{PREFIX}:run:{{{run_id}}}:journal"


def batches(run_id: str) -> str:
    """Hash: a run's ``llm="batch"`` maps: each round's record (``round:<map step>``: the
    provider batches it created) and each answered request (``r:<request key>``: the response)."""
    return f"{PREFIX}:run:{{{run_id}}}:batches"


def lease(run_id: str) -> str:
    """String with a TTL: the attempt whose host is alive. Gone = the host stopped heartbeating."""
    return f"{PREFIX}:run:{{{run_id}}}:lease"


def children(run_id: str) -> str:
    """Set: the ids of the child runs a run started (a cancelled parent cancels them)."""
    return f"{PREFIX}:run:{{{run_id}}}:children"


def local_queue(runner: str) -> str:
    """Stream: the runs a script's process (``genx_ray.start``) runs again when they resume."""
    return f"{PREFIX}:queue:local:{runner}"


def runner(runner: str) -> str:
    """String with a TTL: a script's process that runs runs is alive (genx_ray.service._script)."""
    return f"{PREFIX}:runner:{runner}"


def hub_wake(hub: str) -> str:
    """Stream: wakes one gateway's event hub out of its blocking read (a new stream to follow)."""
    return f"{PREFIX}:hub:{hub}:wake"


def run_keys(run_id: str) -> tuple[str, str, str]:
    """The keys that share a run's lifetime (expired together after the retention period)."""
    return run(run_id), events(run_id), journal(run_id)


def expiring(run_id: str) -> tuple[str, str, str, str]:
    """The keys set to expire when the run ends: :func:`run_keys` and its children set."""
    return run(run_id), events(run_id), journal(run_id), children(run_id)


def run_id_of(key: str) -> str:
    """The run id inside one of the run's keys (the reverse of :func:`run`, :func:`events`...)."""
    return key.split("{", 1)[1].split("}", 1)[0]


def run_index(tenant: str, workflow: str | None = None) -> str:
    """Sorted set (all scores 0, ordered by id = creation time): a tenant's runs, newest last."""
    base = f"{PREFIX}:runs:{part(tenant)}"
    return base if workflow is None else f"{base}:wf:{part(workflow)}"


def tag_index(tenant: str, key: str, value: str) -> str:
    """Sorted set (all scores 0, ordered by id): a tenant's runs tagged ``key: value`` (tags never
    change, so it is written once, when the run is created)."""
    return f"{run_index(tenant)}:tag:{part(key)}:{part(value)}"


OPEN = "open"  # the status index of runs not ended yet (queued, scheduled, running, waiting)


def status_index(tenant: str, status: str) -> str:
    """Sorted set (all scores 0, ordered by id): a tenant's runs that ended with ``status``
    (succeeded, failed, cancelled), or, for :data:`OPEN`, every run not known to have ended.
    A run is added before its status is written and removed lazily, so an index may list a run
    that is not (or not yet) in its status, never miss one: readers check each run's record
    (see :meth:`genx_ray.store._runs.RunStore.list`)."""
    return f"{run_index(tenant)}:st:{part(status)}"


# String: set once every run indexed before the status indexes existed has been added to them
# (genx_ray.store._search.backfill_status_indexes, run by the supervisor).
STATUS_INDEXES_FILLED = f"{PREFIX}:indexes:status-filled"


def tenant_of_index(index: str) -> str | None:
    """The tenant of a tenant's own run index (:func:`run_index` without a workflow), else None
    (a workflow's, a tag's or a status's index)."""
    head = f"{PREFIX}:runs:"
    if not index.startswith(head) or ":" in index[len(head) :]:
        return None
    return unquote(index[len(head) :])


def status_indexes(tenant: str) -> list[str]:
    """Every status index of a tenant (for the supervisor's trimming, see :data:`INDEXES`)."""
    return [status_index(tenant, s) for s in (OPEN, "succeeded", "failed", "cancelled")]


def rerun_idempotency(tenant: str, run_id: str, key: str) -> str:
    """String: the rerun of ``run_id`` an ``Idempotency-Key`` made (kept 24 h, as
    :func:`idempotency`)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"{PREFIX}:idem-rerun:{part(tenant)}:{part(run_id)}:{digest}"


def bulk_idempotency(tenant: str, action: str, key: str) -> str:
    """String: a bulk action (cancel, rerun) an ``Idempotency-Key`` named: JSON {hash, as_of,
    result}, kept 24 h, so a retried request is not done twice (see gateway/operator.py)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"{PREFIX}:idem-bulk:{part(tenant)}:{part(action)}:{digest}"


def schedule_index(tenant: str) -> str:
    """Sorted set (by creation time): a tenant's schedule ids (in the records' slot)."""
    return f"{_SCHEDULES_TAG}:t:{part(tenant)}"


def old_schedule_index(tenant: str) -> str:
    """Where a tenant's schedule index was before it shared the records' slot."""
    return f"{PREFIX}:schedules:t:{part(tenant)}"


def idempotency(tenant: str, workflow: str, key: str) -> str:
    """String: the run an ``Idempotency-Key`` created (kept 24 h, see :mod:`genx_ray.store._runs`).
    The client's key is hashed: any length or character set makes a short, safe key."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"{PREFIX}:idem:{part(tenant)}:{part(workflow)}:{digest}"


@dataclass(frozen=True, slots=True)
class QuotaKeys:
    """A tenant's quota on starting runs (``GENX_TENANT_LIMITS``), under one hash tag so one
    script checks both: a token bucket (hash: tokens, at) and its open runs (sorted set: run id
    -> created at, pruned of finished runs when it looks full)."""

    bucket: str
    open: str
    pruning: str  # string with a short TTL: the open set was pruned a moment ago


def quota(tenant: str) -> QuotaKeys:
    tag = f"{PREFIX}:quota:{{{part(tenant)}}}"
    return QuotaKeys(bucket=f"{tag}:bucket", open=f"{tag}:open", pruning=f"{tag}:pruning")


def cache(component: str, version: str, digest: str, tenant: str | None) -> str:
    """String: a component's cached result, with the TTL the component asked for: one tenant's
    (a tenant never reads another's results, nor learns from ``cached`` what it asked), or,
    with ``tenant`` None, every tenant's (``cache_scope="global"``, an explicit opt-in)."""
    if tenant is None:
        return f"{PREFIX}:cache:{part(component)}:{part(version)}:{digest}"
    return f"{PREFIX}:cache:t:{part(tenant)}:{part(component)}:{part(version)}:{digest}"


def llm_cache(digest: str, tenant: str) -> str:
    """String: a cached LLM response (``genx_ray.llm`` clients with ``cache_ttl``), one
    tenant's."""
    return f"{PREFIX}:llmcache:{part(tenant)}:{digest}"


@dataclass(frozen=True, slots=True)
class BudgetKeys:
    """The keys of one LLM budget (a model glob of ``GENX_LLM_LIMITS``), all in one slot."""

    concurrency: str  # sorted set: slot id -> lease expiry (ms)
    requests: str  # sorted set: slot id -> when granted (ms), the last minute's
    tokens: str  # sorted set: "<slot id>:<tokens>" -> when granted (ms), the last minute's
    pause: str  # string with a TTL: a provider's Retry-After, in force for every process
    waiting: str  # sorted set: process id -> until when it has callers waiting (ms)

    @property
    def all(self) -> list[str]:
        """In the order the limiter's scripts take them."""
        return [self.concurrency, self.requests, self.tokens, self.pause, self.waiting]


def llm_budget(glob: str) -> BudgetKeys:
    # A glob may hold any character ('*', '{'...): its hash is the tag, one slot per budget.
    tag = f"{PREFIX}:llm:{{{hashlib.sha256(glob.encode()).hexdigest()[:16]}}}"
    return BudgetKeys(f"{tag}:conc", f"{tag}:req", f"{tag}:tok", f"{tag}:pause", f"{tag}:waiting")
