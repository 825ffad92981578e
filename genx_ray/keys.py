"""Every Redis key genx-ray uses, in one place.

All keys of one run share the hash tag ``{run_id}`` so they live in one Redis Cluster slot and
the Lua scripts that touch several of them (status + event, journal + event) stay valid there.
"""

from __future__ import annotations

PREFIX = "genx"

# The run queue: a stream the gateway appends run ids to; workers read it through a consumer
# group, so a run handed to the compute plane is delivered to exactly one worker at a time.
QUEUE = f"{PREFIX}:queue"
QUEUE_GROUP = "workers"


# Sorted set: run id -> last heartbeat (unix seconds) of every run a host holds a lease on. The
# supervisor reads the stale end of it; the lease key itself decides whether a run is orphaned.
LEASES = f"{PREFIX}:leases"


# Hash: worker name -> JSON {version, draining, seen}; the live workers and their deployment.
WORKERS = f"{PREFIX}:workers"

# Stream: runs that reached a terminal status and whose webhook is still to be delivered (an
# outbox: a host that dies right after finishing cannot lose the notification).
WEBHOOKS = f"{PREFIX}:webhooks"
WEBHOOK_GROUP = "senders"


def run(run_id: str) -> str:
    """Hash: the run record (status, input, output, attempt, timestamps...)."""
    return f"{PREFIX}:run:{{{run_id}}}"


def events(run_id: str) -> str:
    """Stream: the run's events; entry ids are the SSE event ids."""
    return f"{PREFIX}:run:{{{run_id}}}:events"


def journal(run_id: str) -> str:
    """Hash: step id -> recorded outcome, so a restarted run does not redo completed steps."""
    return f"{PREFIX}:run:{{{run_id}}}:journal"


def lease(run_id: str) -> str:
    """String with a TTL: the attempt whose host is alive. Gone = the host stopped heartbeating."""
    return f"{PREFIX}:run:{{{run_id}}}:lease"


def run_keys(run_id: str) -> tuple[str, str, str]:
    """The keys that share a run's lifetime (expired together after the retention period)."""
    return run(run_id), events(run_id), journal(run_id)


def run_index(tenant: str, workflow: str | None = None) -> str:
    """Sorted set (all scores 0, ordered by id = creation time): a tenant's runs, newest last."""
    base = f"{PREFIX}:runs:{tenant}"
    return base if workflow is None else f"{base}:wf:{workflow}"


def cache(component: str, version: str, digest: str) -> str:
    """String: a component's cached result, with the TTL the component asked for."""
    return f"{PREFIX}:cache:{component}:{version}:{digest}"


def idempotency(tenant: str, workflow: str, key: str) -> str:
    """String: the run an ``Idempotency-Key`` created (kept 24 h, see gateway)."""
    return f"{PREFIX}:idem:{tenant}:{workflow}:{key}"
