"""Shared fixtures: a real Redis and a local Ray, once each per session.

Each test session starts its own private ``redis-server`` (genx_ray.embedded), so two sessions on
one machine (a developer's and CI's) never see each other's queues and runs. Without the binary,
tests use database 9 of the Redis at 127.0.0.1:6379 (flushed once at the start).
``GENX_TEST_REDIS_URL`` overrides both.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis as sync_redis_lib

from genx_ray.connections import async_redis, ping
from genx_ray.embedded import EmbeddedRedis
from genx_ray.errors import ConfigError
from genx_ray.runs import RunStore
from genx_ray.streams import EventStore


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("GENX_TEST_REDIS_URL")
    server = None
    if not url:
        try:
            server = EmbeddedRedis()
            url = server.start()
        except ConfigError:  # no redis-server binary here: share the machine's, in its own db
            server, url = None, "redis://127.0.0.1:6379/9"
            assert ping(url) is None, "no Redis for the tests: install redis-server"
    sync_redis_lib.Redis.from_url(url).flushdb()
    os.environ["GENX_REDIS_URL"] = url  # for everything a test starts (Ray workers, servers)
    yield url
    if server:
        server.stop()


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
def ray_local(redis_url: str) -> Iterator[None]:
    """A local Ray for the whole session: ray.init costs ~3 s and 0.7 GB here."""
    from genx_ray.cluster import ensure_ray, shutdown_ray

    # Ray workers import test modules by name (components defined in tests run as Ray tasks).
    here = os.path.dirname(__file__)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    ensure_ray("local", redis_url=redis_url)
    yield
    shutdown_ray()
