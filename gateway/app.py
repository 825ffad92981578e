"""The API plane: an automatic REST API for every registered workflow.

It never imports Ray. It hands a run to the compute plane once (run record + queue entry in
Redis) and from then on only reads Redis, so any number of replicas can serve any client. It also
serves the browser run viewer (:mod:`gateway.ui`); browser apps on other origins reach the API
through CORS when ``GENX_CORS_ORIGINS`` names them (no CORS at all otherwise).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from gateway import errors, metrics, openapi, operator, schedules, ui
from gateway.hub import EventHub
from gateway.outage import RedisOutage
from gateway.routes import STREAM_TOKEN_HEADER, router
from gateway.sse import StreamSlots
from gateway.tokens import TokenSigner, shared_secret
from genx_ray import __version__
from genx_ray.flow import Registry
from genx_ray.flow import registry as default_registry
from genx_ray.model import RedisUnavailable, Settings
from genx_ray.observe import TraceRequests, setup, tracing_enabled
from genx_ray.store import Quotas, RunStore, async_redis, ping


def create_app(
    settings: Settings | None = None,
    registry: Registry | None = None,
    redis_url: str | None = None,
) -> FastAPI:
    settings = settings or Settings.current()
    setup("gateway")  # the OTEL_* variables: traces only when they name an exporter
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
        app.state.quotas = Quotas(client, settings.tenant_limits)
        app.state.stream_slots = StreamSlots(settings.max_streams_per_tenant)
        secret = await shared_secret(client, settings.token_secret)
        app.state.tokens = TokenSigner(secret, settings.token_ttl)
        raw = async_redis(url, decode=False)  # the hub passes stored events on as bytes
        app.state.outage = outage = RedisOutage(client)
        app.state.hub = hub = EventHub(raw)
        hub.outage = outage  # one log line per outage, whoever meets it first
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()
            await outage.close()
            await raw.aclose()
            await client.aclose()

    app = FastAPI(
        title="genx-ray",
        version=__version__,
        summary="Durable LLM and agent workflows, each served as a REST API.",
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,  # operationIds: get_run...
        # Request spans are genx_ray.observe.TraceRequests's: FastAPI's own would record the
        # query string, where run tokens travel (?token=).
        telemetry={"tracing": False},
    )
    app.state.settings = settings
    app.state.registry = registry
    errors.install(app)
    app.include_router(operator.router)  # first: /v1/runs/bulk/... is not a run named "bulk"
    app.include_router(router)
    app.include_router(schedules.router)
    app.include_router(ui.router)
    app.include_router(metrics.router)
    openapi.install(app, registry, settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],  # a browser reads runs and answers input
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key"],
            expose_headers=["Location", "Idempotent-Replayed", STREAM_TOKEN_HEADER],
            max_age=600,
        )
    if tracing_enabled():
        app.add_middleware(TraceRequests)  # a span per request: a run's trace starts there
    return app
