"""The routes of the API plane, on one module-level router. Every route reads Redis only, through
the run store and the event hub the app's lifespan made (``request.app.state``)."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import suppress
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from gateway.auth import tenant
from gateway.errors import PayloadTooLarge, error_response
from gateway.hub import EventHub
from gateway.sse import NDJSON, event_response
from genx_ray.errors import InvalidTransition, UserError
from genx_ray.runs import Run, RunStatus, RunStore
from genx_ray.streams import START, check_event_id
from genx_ray.webhooks import notify
from genx_ray.workflow import Registry

MAX_WAIT_SECONDS = 300.0

router = APIRouter()


# Dependencies are coroutines: FastAPI runs a plain ``def`` one in a thread pool, a thread hop
# per dependency per request (a fifth of a request's CPU, measured).


async def _runs(request: Request) -> RunStore:
    store: RunStore = request.app.state.runs
    return store


async def _hub(request: Request) -> EventHub:
    hub: EventHub = request.app.state.hub
    return hub


async def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


Tenant = Annotated[str, Depends(tenant)]
Runs = Annotated[RunStore, Depends(_runs)]
Hub = Annotated[EventHub, Depends(_hub)]
Workflows = Annotated[Registry, Depends(_registry)]


def run_json(run: Run) -> dict[str, Any]:
    return run.model_dump(mode="json", exclude={"tenant"})


@router.get("/healthz", tags=["ops"])
async def healthz(request: Request, hub: Hub) -> JSONResponse:
    try:
        await request.app.state.redis.ping()
    except Exception as exc:
        return error_response(503, "redis_unavailable", str(exc))
    return JSONResponse({"status": "ok", "followers": hub.followers})


@router.get("/v1/workflows", tags=["workflows"])
async def list_workflows(_: Tenant, registry: Workflows) -> list[dict[str, Any]]:
    return [wf.describe() for wf in registry]


@router.post(
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
    hub: Hub,
    registry: Workflows,
    wait: Annotated[float | None, Query(ge=0, le=MAX_WAIT_SECONDS)] = None,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    wf = registry.get(name)
    body = await read_json(request, request.app.state.settings.max_body_bytes)
    if not isinstance(body, dict):
        raise UserError('the body must be a JSON object: {"input": ...}')
    unknown = set(body) - {"input"}
    if unknown:
        raise UserError(f"unknown body field(s) {sorted(unknown)}; expected only 'input'")
    payload = wf.encode_input(body.get("input"))  # 422 on schema failure; nothing created
    replayed = False
    if idempotency_key:
        run, replayed = await runs.create_idempotent(name, payload, tenant=who, key=idempotency_key)
    else:
        run = await runs.create(name, payload, tenant=who, enqueue=True)
    headers = {"Location": f"/v1/runs/{run.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if accept and "text/event-stream" in accept:
        return event_response(hub.stream(run.id, START), headers=headers)
    if wait:
        run = await _wait_for_end(hub, runs, run, wait)
    status = 200 if run.status.terminal or replayed else 202
    return JSONResponse(run_json(run), status_code=status, headers=headers)


@router.get("/v1/runs/{run_id}", tags=["runs"])
async def get_run(run_id: str, who: Tenant, runs: Runs) -> dict[str, Any]:
    return run_json(await runs.get(run_id, tenant=who))


@router.get("/v1/runs", tags=["runs"])
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
    return {"runs": [run_json(r) for r in page], "next_cursor": next_cursor}


@router.get("/v1/runs/{run_id}/events", tags=["runs"])
async def run_events(
    run_id: str,
    who: Tenant,
    runs: Runs,
    hub: Hub,
    after: Annotated[str | None, Query(max_length=48)] = None,
    last_event_id: Annotated[str | None, Header(max_length=48)] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    start = last_event_id or after
    start = check_event_id(start) if start else START
    await runs.get(run_id, tenant=who)  # 404 before any stream starts
    ndjson = bool(accept and NDJSON in accept and "text/event-stream" not in accept)
    return event_response(hub.stream(run_id, start), ndjson=ndjson)


@router.post("/v1/runs/{run_id}/cancel", tags=["runs"])
async def cancel_run(run_id: str, request: Request, who: Tenant, runs: Runs) -> JSONResponse:
    run = await runs.get(run_id, tenant=who)
    if run.status.terminal and run.status is not RunStatus.CANCELLED:
        raise InvalidTransition(run_id, run.status.value, RunStatus.CANCELLED.value)
    if await runs.request_cancel(run_id) is RunStatus.CANCELLED and not run.status.terminal:
        await notify(runs.redis, request.app.state.settings, run_id)  # it ends here, not in a host
    run = await runs.get(run_id, tenant=who)
    return JSONResponse(run_json(run), status_code=200 if run.status.terminal else 202)


async def read_json(request: Request, limit: int) -> Any:
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
        async for batch in hub.stream(run.id, START):
            if batch and batch[-1].terminal:
                return

    deadline = time.monotonic() + seconds
    with suppress(TimeoutError):
        await asyncio.wait_for(until_terminal(), max(0.0, deadline - time.monotonic()))
    return await runs.get(run.id)
