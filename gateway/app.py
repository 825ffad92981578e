"""The API plane: an automatic REST API for every registered workflow.

It never imports Ray. It hands a run to the compute plane once (run record + queue entry in
Redis) and from then on only reads Redis, so any number of replicas can serve any client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway import errors
from gateway.hub import EventHub
from gateway.routes import router
from genx_ray import __version__
from genx_ray.connections import async_redis, ping
from genx_ray.errors import RedisUnavailable
from genx_ray.runs import RunStore
from genx_ray.settings import Settings
from genx_ray.workflow import Registry
from genx_ray.workflow import registry as default_registry


def create_app(
    settings: Settings | None = None,
    registry: Registry | None = None,
    redis_url: str | None = None,
) -> FastAPI:
    settings = settings or Settings.current()
    if registry is None:
        registry = default_registry.load(settings.workflows)
    url = redis_url or settings.redis_url

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reason = await asyncio.to_thread(ping, url)
        if reason is not None:
            raise RedisUnavailable(url, reason)
        client = async_redis(url)
        app.state.redis = client
        app.state.runs = RunStore(
            client, maxlen=settings.stream_maxlen, retention_seconds=settings.retention_seconds
        )
        raw = async_redis(url, decode=False)  # the hub passes stored events on as bytes
        app.state.hub = hub = EventHub(raw)
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()
            await raw.aclose()
            await client.aclose()

    app = FastAPI(
        title="genx-ray",
        version=__version__,
        summary="Durable LLM and agent workflows, each served as a REST API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    errors.install(app)
    app.include_router(router)
    return app
