"""The API plane: an automatic REST API for every registered workflow.

It never imports Ray. It hands a run to the compute plane once (run record + queue entry in
Redis) and from then on only reads Redis, so any number of replicas can serve any client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from gateway import errors
from gateway.errors import IdempotencyConflict, PayloadTooLarge, Unauthorized
from gateway.hub import EventHub
from genx_ray import keys
from genx_ray.connections import async_redis, ping
from genx_ray.errors import InvalidTransition, RedisUnavailable, UserError
from genx_ray.events import RunCancelled, dumps, is_terminal
from genx_ray.ids import new_run_id
from genx_ray.runs import DEFAULT_TENANT, Run, RunStatus, RunStore
from genx_ray.settings import Settings
from genx_ray.streams import START, StreamEntry, check_event_id
from genx_ray.values import canonical_hash
from genx_ray.webhooks import notify
from genx_ray.workflow import Registry
from genx_ray.workflow import registry as default_registry

IDEMPOTENCY_TTL = 24 * 3600  # how long an Idempotency-Key maps to its run
MAX_WAIT_SECONDS = 300.0
SSE_PING_SECONDS = 15
NDJSON = "application/x-ndjson"


def tenant(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The caller's tenant, from its bearer key (one tenant when no keys are configured)."""
    api_keys = request.app.state.settings.api_keys
    if not api_keys:
        return DEFAULT_TENANT
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("an Authorization: Bearer <key> header is required")
    for key, name in api_keys.items():
        if hmac.compare_digest(key.encode(), token.strip().encode()):
            return str(name)
    raise Unauthorized("unknown API key")


def runs_store(request: Request) -> RunStore:
    store: RunStore = request.app.state.runs
    return store


Tenant = Annotated[str, Depends(tenant)]
Runs = Annotated[RunStore, Depends(runs_store)]


def _run_json(run: Run) -> dict[str, Any]:
    return run.model_dump(mode="json", exclude={"tenant"})


def create_app(
    settings: Settings | None = None,
    registry: Registry | None = None,
    redis_url: str | None = None,
) -> FastAPI:
    settings = settings or Settings.from_env()
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
        app.state.hub = hub = EventHub(client)
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()
            await client.aclose()

    app = FastAPI(
        title="genx-ray",
        version="0.1.0",
        summary="Durable LLM and agent workflows, each served as a REST API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    errors.install(app)

    @app.get("/healthz", tags=["ops"])
    async def healthz(request: Request) -> JSONResponse:
        try:
            await request.app.state.redis.ping()
        except Exception as exc:
            return errors.error_response(503, "redis_unavailable", str(exc))
        return JSONResponse({"status": "ok", "followers": request.app.state.hub.followers})

    @app.get("/v1/workflows", tags=["workflows"])
    async def list_workflows(_: Tenant) -> list[dict[str, Any]]:
        return [wf.describe() for wf in registry]

    @app.post(
        "/v1/workflows/{name}/runs",
        tags=["runs"],
        status_code=202,
        responses={200: {"description": "finished within ?wait, or an idempotent replay"}},
    )
    async def start_run(
        name: str,
        request: Request,
        who: Tenant,
        runs: Runs,
        wait: Annotated[float | None, Query(ge=0, le=MAX_WAIT_SECONDS)] = None,
        idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
        accept: Annotated[str | None, Header()] = None,
    ) -> Response:
        wf = registry.get(name)
        body = await _read_json(request, settings.max_body_bytes)
        if not isinstance(body, dict):
            raise UserError('the body must be a JSON object: {"input": ...}')
        unknown = set(body) - {"input"}
        if unknown:
            raise UserError(f"unknown body field(s) {sorted(unknown)}; expected only 'input'")
        payload = wf.encode_input(body.get("input"))  # 422 on schema failure; nothing created
        run: Run | None = None
        replayed = False
        if idempotency_key:
            run, replayed = await _idempotent(runs, who, name, idempotency_key, payload)
        if run is None:
            run = await runs.create(name, payload, tenant=who, enqueue=True)
        headers = {"Location": f"/v1/runs/{run.id}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        if accept and "text/event-stream" in accept:
            return _sse(request.app.state.hub.stream(run.id, START), headers)
        if wait:
            run = await _wait_for_end(request.app.state.hub, runs, run, wait)
        status = 200 if run.status.terminal or replayed else 202
        return JSONResponse(_run_json(run), status_code=status, headers=headers)

    async def _idempotent(
        runs: RunStore, who: str, name: str, key: str, payload: Any
    ) -> tuple[Run | None, bool]:
        """The run this key made before (replayed=True), or a new run reserved under it."""
        ikey = keys.idempotency(who, name, key)
        digest = canonical_hash(payload)
        for _ in range(3):
            run_id = new_run_id()
            record = json.dumps({"run": run_id, "hash": digest})
            if await runs.redis.set(ikey, record, nx=True, ex=IDEMPOTENCY_TTL):
                return await runs.create(
                    name, payload, tenant=who, run_id=run_id, enqueue=True
                ), False
            held = await runs.redis.get(ikey)
            if held is None:
                continue  # expired in between: try to take it again
            first = json.loads(held)
            if first["hash"] != digest:
                raise IdempotencyConflict(
                    "this Idempotency-Key was used with a different input for this workflow"
                )
            # The first request may still be creating its run, or may have died before it did:
            # creating is idempotent, so this returns its run either way.
            return await runs.create(
                name, payload, tenant=who, run_id=first["run"], enqueue=True
            ), True
        raise IdempotencyConflict("the Idempotency-Key is contended; retry")

    @app.get("/v1/runs/{run_id}", tags=["runs"])
    async def get_run(run_id: str, who: Tenant, runs: Runs) -> dict[str, Any]:
        return _run_json(await runs.get(run_id, tenant=who))

    @app.get("/v1/runs", tags=["runs"])
    async def list_runs(
        who: Tenant,
        runs: Runs,
        workflow: str | None = None,
        status: RunStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(max_length=64)] = None,
    ) -> dict[str, Any]:
        page, next_cursor = await runs.list(
            tenant=who, workflow=workflow, status=status, limit=limit, cursor=cursor
        )
        return {"runs": [_run_json(r) for r in page], "next_cursor": next_cursor}

    @app.get("/v1/runs/{run_id}/events", tags=["runs"])
    async def run_events(
        run_id: str,
        request: Request,
        who: Tenant,
        runs: Runs,
        after: Annotated[str | None, Query(max_length=48)] = None,
        last_event_id: Annotated[str | None, Header(max_length=48)] = None,
        accept: Annotated[str | None, Header()] = None,
    ) -> Response:
        start = last_event_id or after
        start = check_event_id(start) if start else START
        await runs.get(run_id, tenant=who)  # 404 before any stream starts
        entries = request.app.state.hub.stream(run_id, start)
        if accept and NDJSON in accept and "text/event-stream" not in accept:
            return StreamingResponse(_ndjson(entries), media_type=NDJSON)
        return _sse(entries)

    @app.post("/v1/runs/{run_id}/cancel", tags=["runs"])
    async def cancel_run(run_id: str, who: Tenant, runs: Runs) -> JSONResponse:
        run = await runs.get(run_id, tenant=who)
        if run.status.terminal and run.status is not RunStatus.CANCELLED:
            raise InvalidTransition(run_id, run.status.value, RunStatus.CANCELLED.value)
        event = RunCancelled(run_id=run_id, reason="cancel requested")
        if await runs.request_cancel(run_id, dumps(event)) is RunStatus.CANCELLED:
            await notify(runs.redis, settings, run_id)  # a queued run ends here, not in a host
        run = await runs.get(run_id, tenant=who)
        return JSONResponse(_run_json(run), status_code=200 if run.status.terminal else 202)

    return app


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the {limit}-byte limit")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"the body is not valid JSON: {exc}") from None


async def _wait_for_end(hub: EventHub, runs: RunStore, run: Run, seconds: float) -> Run:
    async def until_terminal() -> None:
        async for entry in hub.stream(run.id, START):
            if is_terminal(entry.event):
                return

    deadline = time.monotonic() + seconds
    with suppress(TimeoutError):
        await asyncio.wait_for(until_terminal(), max(0.0, deadline - time.monotonic()))
    return await runs.get(run.id)


def _sse(entries: AsyncIterator[StreamEntry], headers: dict[str, str] | None = None) -> Response:
    async def frames() -> AsyncIterator[ServerSentEvent]:
        async for entry in entries:
            yield ServerSentEvent(data=dumps(entry.event), event=entry.event.type, id=entry.id)

    return EventSourceResponse(
        frames(), ping=SSE_PING_SECONDS, headers={"Cache-Control": "no-store", **(headers or {})}
    )


async def _ndjson(entries: AsyncIterator[StreamEntry]) -> AsyncIterator[bytes]:
    async for entry in entries:
        line = json.dumps(
            {"id": entry.id, **entry.event.model_dump(mode="json", exclude_none=True)}
        )
        yield line.encode() + b"\n"
