from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
import wf_fixtures  # noqa: F401 - registers the test workflows

from gateway.app import create_app
from genx_ray.flow import registry
from genx_ray.model import Settings
from genx_ray.service import Worker
from genx_ray.store import async_redis

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture(scope="module")
async def worker(redis_url: str) -> AsyncIterator[Worker]:
    """A real worker taking runs from the queue, on the test's event loop."""
    client = async_redis(redis_url)
    w = Worker(client, registry=registry, max_runs=16, drain_timeout=2, redis_url=redis_url)
    import asyncio

    task = asyncio.create_task(w.serve())
    yield w
    w.stop()
    await task
    await client.aclose()


@pytest.fixture(scope="module")
def make_api(redis_url: str, worker: Worker) -> ApiFactory:
    """An in-process gateway (its lifespan run) and a client talking to it over ASGI."""

    @asynccontextmanager
    async def factory(**env: str) -> AsyncIterator[httpx.AsyncClient]:
        settings = Settings.from_env({"GENX_REDIS_URL": redis_url, **env})
        app = create_app(settings, registry, redis_url)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                yield client

    return factory


@pytest.fixture(scope="module")
async def api(make_api: ApiFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with make_api() as client:
        yield client


def sse(text: str) -> list[dict[str, Any]]:
    """Parse SSE frames: [{"id", "event", "data"}] (keep-alive comments skipped)."""
    import json

    frames, cur = [], {}
    for line in text.splitlines():
        if not line:
            if "data" in cur:
                cur["data"] = json.loads(cur["data"])
                frames.append(cur)
            cur = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            cur[field] = value.lstrip()
    return frames
