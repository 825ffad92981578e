"""One tenant's poisoned schedule never stops the fleet (issue #23, point 1), with real
processes: two workers; a schedule whose only tick passes (a 7-field cron naming a year) is
disabled with its reason, while a run whose worker is killed afterwards still resumes on the
other worker, and another tenant's every-2-seconds schedule keeps ticking."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from genx_ray.model import RunStatus
from genx_ray.store import EventStore, RunStore, ScheduleStore, keys

from .conftest import WorkerFactory

pytestmark = pytest.mark.timeout(300)


async def _until(predicate: Any, within: float, every: float = 0.1) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(every)


async def _ready(runs: RunStore, proc: Any) -> None:
    name = f"{socket.gethostname()}-{proc.pid}"

    async def ready() -> bool:
        raw = await runs.redis.hget(keys.WORKERS, name)
        return raw is not None and json.loads(raw).get("hosts_ready", 0) >= 1

    await _until(ready, within=120)


def _once_at(when: float) -> str:
    """A cron with one tick, at ``when`` (UTC): minute hour day month weekday second year."""
    t = datetime.fromtimestamp(when, UTC)
    return f"{t.minute} {t.hour} {t.day} {t.month} * {t.second} {t.year}"


async def test_a_poisoned_schedule_stops_no_recovery_and_no_other_tenant(
    spawn_worker: WorkerFactory, runs: RunStore, events: EventStore
) -> None:
    workers = [spawn_worker(), spawn_worker()]
    for proc in workers:
        await _ready(runs, proc)
    store = ScheduleStore(runs.redis)
    victim, attacker = f"steady{secrets.token_hex(3)}", f"poison{secrets.token_hex(3)}"
    steady = await store.create("echo", "* * * * * */2", {"text": "tick"}, timezone="UTC",
                                tenant=victim, overlap="allow")  # fmt: skip
    poison = await store.create("echo", _once_at(time.time() + 4), {"text": "once"},
                                timezone="UTC", tenant=attacker)  # fmt: skip

    async def disabled() -> bool:
        return (await store.get(poison.id, tenant=attacker)).disabled is not None

    await _until(disabled, within=30)  # today: never; every supervisor loop fails from here on
    reason = (await store.get(poison.id, tenant=attacker)).disabled
    assert reason is not None and "no tick after" in reason
    poisoned_at = time.time()
    ran, _ = await runs.list(tenant=attacker)
    assert len(ran) == 1  # its one tick did start its run

    # A run whose worker is killed after the poisoned tick: the other worker resumes it.
    run = await runs.create("phases", {"n": 30, "delay": 0.3}, enqueue=True)

    async def phased() -> bool:
        return any(e.type == "progress" for e in await events.read(run.id))

    await _until(phased, within=60)
    owner = str(await runs.redis.hget(keys.run(run.id), "worker"))
    host = str(await runs.redis.hget(keys.run(run.id), "host"))
    (doomed,) = [p for p in workers if owner.endswith(f"-{p.pid}")]
    os.killpg(doomed.pid, signal.SIGKILL)  # the worker, its local Ray...
    with contextlib.suppress(ProcessLookupError, ValueError):  # ...and its run host
        os.kill(int(host.rsplit(":", 1)[1]), signal.SIGKILL)
    doomed.wait()

    async def resumed() -> bool:
        now = await runs.get(run.id)
        return now.attempt == 2 and now.status is not RunStatus.QUEUED

    await _until(resumed, within=60)  # today: stays running (90 s and more)
    async for _ in events.follow(run.id):
        pass
    done = await runs.get(run.id)
    assert done.status is RunStatus.SUCCEEDED and done.output == sum(range(30))

    # The other tenant's schedule ticked all along: a run every 2 s since the poisoned tick.
    started, _ = await runs.list(tenant=victim, limit=200)
    after = [r for r in started if r.created_at.timestamp() > poisoned_at]
    elapsed = time.time() - poisoned_at
    assert len(after) >= elapsed / 2 - 3, (len(after), elapsed)
    await store.delete(steady.id, tenant=victim)
    await store.delete(poison.id, tenant=attacker)
