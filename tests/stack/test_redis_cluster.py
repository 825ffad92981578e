"""Redis Cluster for real: a URL of any node gives cluster clients, scripts and pipelines stay
within a slot and survive a flushed script cache, and a run goes on through the loss of the
master holding it, once its replica takes over.

(The API, durability, crash and LLM limiter tests also run against the session's cluster: see
``ON_CLUSTER_TOO`` in conftest.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio.cluster
import redis.cluster
import wf_fixtures  # noqa: F401 - registers the test workflows
from cluster_redis import LocalRedisCluster
from redis.exceptions import RedisError

import genx_ray
from genx_ray.flow import registry
from genx_ray.model import Run, RunStatus
from genx_ray.service import Worker
from genx_ray.store import (
    EventStore,
    RunStore,
    async_redis,
    is_cluster,
    is_cluster_url,
    keys,
    sync_redis,
)
from genx_ray.store import scripts as lua


def test_a_node_of_a_cluster_gives_cluster_clients(
    redis_cluster: LocalRedisCluster, single_redis_url: str
) -> None:
    assert is_cluster_url(redis_cluster.url) and not is_cluster_url(single_redis_url)
    client = sync_redis(redis_cluster.url)
    assert isinstance(client, redis.cluster.RedisCluster) and is_cluster(client)
    client.close()
    assert isinstance(async_redis(redis_cluster.url), redis.asyncio.cluster.RedisCluster)
    assert not is_cluster(sync_redis(single_redis_url))


def test_genx_info_says_which_kind_of_redis(redis_cluster: LocalRedisCluster) -> None:
    env = {**os.environ, "GENX_REDIS_URL": redis_cluster.url}
    out = subprocess.run([sys.executable, "-m", "genx_ray.cli", "info"], env=env,
                         capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert f"{redis_cluster.url} (Redis Cluster; GENX_REDIS_URL)" in out


async def test_scripts_of_many_runs_go_per_node_and_reload_after_a_flushed_cache(
    redis_cluster: LocalRedisCluster,
) -> None:
    client = async_redis(redis_cluster.url)
    try:
        ids = [f"c{i}" for i in range(60)]  # spread over every master
        assert len({redis_cluster.master_of(keys.run(r)) for r in ids}) == 3
        for r in ids:
            await client.set(keys.lease(r), "1")
        await client.script_flush()  # as on a replica promoted by a failover: no scripts
        calls: list[lua.Call] = [(lua.RELEASE, [keys.lease(r)], ["1" if i % 2 else "2"])
                                 for i, r in enumerate(ids)]  # fmt: skip
        assert await lua.execute_scripts(client, calls) == [i % 2 for i in range(60)]  # in order
        assert [await client.exists(keys.lease(r)) for r in ids] == [1 - i % 2 for i in range(60)]
    finally:
        await client.aclose()


@pytest.fixture
def own_cluster() -> Iterator[LocalRedisCluster]:
    """A cluster of this test's own: it loses a master."""
    cluster = LocalRedisCluster(node_timeout_ms=2000)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
async def cluster_worker(own_cluster: LocalRedisCluster) -> AsyncIterator[tuple[Any, Worker]]:
    client = async_redis(own_cluster.url)
    # Its runs outlive it (as on a Ray cluster it joined): only their leases (30 s) speak for
    # them. (A worker whose runs die with it is judged dead after 3 s without a heartbeat,
    # shorter than a failover: its runs would restart from their journals instead.)
    w = Worker(client, registry=registry, max_runs=8, drain_timeout=2, redis_url=own_cluster.url,
               fate="own")  # fmt: skip
    task = asyncio.create_task(w.serve())
    yield client, w
    w.stop()
    await task
    await client.aclose()


async def _phases(events: EventStore, run_id: str) -> list[int]:
    return [e.event.data["i"] for e in await events.read(run_id)  # type: ignore[union-attr,index]
            if e.type == "progress" and e.event.kind == "phase"]  # type: ignore[union-attr]  # fmt: skip


async def _ended(runs: RunStore, run_id: str, within: float = 120) -> Run:
    """The run once it ended, asked again through the failover (reads fail meanwhile)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(RedisError):
            run = await runs.get(run_id)
            if run.status.terminal:
                return run
        await asyncio.sleep(0.2)
    raise AssertionError(f"run {run_id} did not end within {within}s")


@pytest.mark.timeout(180)
async def test_a_run_goes_on_when_the_master_holding_it_is_killed(
    own_cluster: LocalRedisCluster, cluster_worker: tuple[Any, Worker]
) -> None:
    client, _ = cluster_worker
    runs, events = RunStore(client, retention_seconds=3600), EventStore(client)
    n = 30
    run = await runs.create("phases", {"n": n, "delay": 0.2}, enqueue=True)
    deadline = time.monotonic() + 60
    while len(await _phases(events, run.id)) < 3:
        assert time.monotonic() < deadline, "the run did not start"
        await asyncio.sleep(0.05)
    killed = own_cluster.kill_master_of(keys.run(run.id))  # kill -9, mid-run
    done = await _ended(runs, run.id)
    assert done.status is RunStatus.SUCCEEDED and done.output == sum(range(n))
    assert done.attempt == 1  # no restart: the run's own writes waited for the failover
    assert own_cluster.master_of(keys.run(run.id)) != killed  # its replica took over
    phases = await _phases(events, run.id)
    # Replication is asynchronous: a write the dead master acknowledged in its last moments
    # may be missing on the replica, but none is doubled, and the run's last ones are there.
    assert phases == sorted(set(phases)) and phases[-1] == n - 1 and len(phases) >= n - 3
    assert [e.type for e in await events.read(run.id)][-1] == "run.succeeded"


def test_a_run_started_from_a_script_streams_and_cancels_on_a_cluster(
    redis_cluster: LocalRedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENX_REDIS_URL", redis_cluster.url)
    done = genx_ray.start("echo", {"text": "on a cluster"})
    assert done.result(30) == "ON A CLUSTER"
    types = [e.type for e in done.events()]  # the handle's own reads: XREAD on a cluster client
    assert types[0] == "run.queued" and types[-1] == "run.succeeded"
    sleeper = genx_ray.start("sleepy", {"seconds": 60})
    while sleeper.status is not RunStatus.RUNNING:
        time.sleep(0.01)
    t0 = time.monotonic()
    sleeper.cancel()  # through the signals stream, which the runtime follows with XREAD
    with pytest.raises(genx_ray.RunCancelled):
        sleeper.result(10)
    assert time.monotonic() - t0 < 2
