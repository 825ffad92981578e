"""Shared fixtures: a real Redis (the machine's, else a private one) and a local Ray, once each.

Tests use database 9 of the Redis at 127.0.0.1:6379 when one answers there (flushed once at the
start of the session), else an embedded Redis this session starts. ``GENX_TEST_REDIS_URL``
overrides both.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis as sync_redis_lib

from genx_ray.connections import async_redis, ping
from genx_ray.embedded import EmbeddedRedis
from genx_ray.runs import RunStore
from genx_ray.streams import EventStore


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("GENX_TEST_REDIS_URL")
    server = None
    if not url:
        url = "redis://127.0.0.1:6379/9"
        if ping(url) is not None:
            server = EmbeddedRedis()
            url = server.start()
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
