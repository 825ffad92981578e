"""The routes of the API plane, on one module-level router. Every route reads Redis only, through
the run store and the event hub the app's lifespan made (``request.app.state``)."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from gateway.auth import run_answerer, run_reader, tenant
from gateway.errors import PayloadTooLarge, error_response
from gateway.hub import EventHub, RawEntry
from gateway.outage import RETRY_AFTER_SECONDS
from gateway.sse import NDJSON, StreamSlots, event_response
from gateway.tokens import READ, SCOPES, TokenSigner
from genx_ray.flow import Registry
from genx_ray.model import (
    MAX_TAGS,
    InputInvalid,
    InvalidTransition,
    Run,
    RunStatus,
    UserError,
    check_priority,
    check_tags,
    parse_tag,
)
from genx_ray.store import (
    START,
    Quotas,
    RunFilter,
    RunStore,
    check_event_id,
    notify,
    resume_point,
    start_time,
)

MAX_WAIT_SECONDS = 300.0
RUN_BODY_FIELDS = {"input", "start_at", "delay_seconds", "tags", "priority"}
STREAM_TOKEN_HEADER = "Genx-Stream-Token"  # a start answered with its event stream carries it
MAX_JSON_DEPTH = 64  # arrays and objects within each other in a request body
MAX_DIGITS = sys.get_int_max_str_digits() or 4300  # the longest integer a body may hold

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


async def _tokens(request: Request) -> TokenSigner:
    signer: TokenSigner = request.app.state.tokens
    return signer


Tenant = Annotated[str, Depends(tenant)]  # an API key's tenant (or the one tenant, keys off)
Reader = Annotated[str, Depends(run_reader)]  # the same, or a run token's for its own run
Answerer = Annotated[str, Depends(run_answerer)]  # the same, or an answer token's for its run
Tokens = Annotated[TokenSigner, Depends(_tokens)]
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
        request.app.state.outage.failed(exc)
        response = error_response(503, "redis_unavailable", str(exc))
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
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
    tokens: Tokens,
    wait: Annotated[float | None, Query(ge=0, le=MAX_WAIT_SECONDS)] = None,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    wf = registry.get(name)
    body = await read_json(request, request.app.state.settings.max_body_bytes)
    if not isinstance(body, dict):
        raise UserError('the body must be a JSON object: {"input": ...}')
    unknown = set(body) - RUN_BODY_FIELDS
    if unknown:
        raise UserError(
            f"unknown body field(s) {sorted(unknown)}; expected {sorted(RUN_BODY_FIELDS)}"
        )
    payload = wf.encode_input(body.get("input"))  # 422 on schema failure; nothing created
    start_at = start_time(_rfc3339(body.get("start_at")), _seconds(body.get("delay_seconds")))
    tags = check_tags(body.get("tags"))
    priority = check_priority(body.get("priority"))
    quotas: Quotas = request.app.state.quotas
    replayed = False
    if idempotency_key:  # a replay is no new run: not counted; a new run is (429: nothing made)
        run, replayed = await runs.create_idempotent(
            name,
            payload,
            tenant=who,
            key=idempotency_key,
            start_at=start_at,
            quotas=quotas,
            tags=tags,
            priority=priority,
        )
    else:
        await quotas.admit(who)  # 429 over quota: nothing created
        run = await runs.create(
            name, payload, tenant=who, enqueue=True, start_at=start_at, tags=tags,
            priority=priority,
        )  # fmt: skip
        await quotas.opened(who, run.id)
    headers = {"Location": f"/v1/runs/{run.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if accept and "text/event-stream" in accept:  # the run's events at once: its token in a header
        release = _slots(request).take(who)  # the run is made: past the limit, a 429 says so
        headers[STREAM_TOKEN_HEADER] = tokens.mint(run.id, who)[0]
        return event_response(hub.stream(run.id, START), headers=headers, release=release)
    if wait and run.status is not RunStatus.SCHEDULED:  # a delayed run: no waiting for it
        run = await _wait_for_end(hub, runs, run, wait)
    status = 200 if run.status.terminal or replayed else 202
    # The creator's read-only pass for the run, to hand to a browser (docs/api.md, run tokens).
    body = {**run_json(run), "stream_token": tokens.mint(run.id, who)[0]}
    return JSONResponse(body, status_code=status, headers=headers)


@router.get("/v1/runs/{run_id}", tags=["runs"])
async def get_run(run_id: str, who: Reader, runs: Runs) -> dict[str, Any]:
    return run_json(await runs.get(run_id, tenant=who))


TagQuery = Annotated[
    list[str] | None, Query(description="key:value; repeat it for runs with every tag given")
]
TimeQuery = Annotated[
    str | None, Query(max_length=64, description="RFC 3339, e.g. 2026-12-01T00:00:00Z")
]


def run_filter(
    workflow: str | None = None,
    status: RunStatus | str | None = None,
    tag: list[str] | str | None = None,
    created_after: str | None = None,
    created_before: str | None = None,
) -> RunFilter:
    """A search's filter from the API's parameters (a query's, or a bulk action's body), each
    checked: :class:`UserError` (400) naming the one that is not what it should be."""
    if workflow is not None and not isinstance(workflow, str):
        raise UserError("workflow must be a string")
    if status is not None:
        try:
            status = RunStatus(status)
        except ValueError:
            raise UserError(f"status must be one of {[s.value for s in RunStatus]}") from None
    if tag is not None and not isinstance(tag, str | list):
        raise UserError("tag: key:value, or a list of them")
    tags = [tag] if isinstance(tag, str) else list(tag or [])
    if len(tags) > MAX_TAGS or not all(isinstance(t, str) for t in tags):
        raise UserError(f"tag: at most {MAX_TAGS} filters, each key:value")
    after = _instant("created_after", created_after)
    before = _instant("created_before", created_before)
    return RunFilter(workflow, status, tuple(parse_tag(t) for t in tags), after, before)


def _instant(name: str, value: Any) -> float | None:
    if value is None:
        return None
    when = None
    if isinstance(value, str):
        with suppress(ValueError):
            when = datetime.fromisoformat(value)
    if when is None or when.tzinfo is None:
        raise UserError(f"{name}: not an RFC 3339 time with a zone (e.g. 2026-12-01T00:00:00Z)")
    return when.timestamp()


@router.get("/v1/runs", tags=["runs"])
async def list_runs(
    who: Tenant,
    runs: Runs,
    workflow: str | None = None,
    status: RunStatus | None = None,
    tag: TagQuery = None,
    created_after: TimeQuery = None,
    created_before: TimeQuery = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    """The tenant's runs, newest first, filtered by workflow, status, tags (each ``key:value``)
    and creation time; every filter is answered from an index."""
    found = run_filter(workflow, status, tag, created_after, created_before)
    page, next_cursor = await runs.list(
        tenant=who, workflow=found.workflow, status=found.status, tags=found.tags,
        created_after=found.created_after, created_before=found.created_before, limit=limit,
        cursor=cursor,
    )  # fmt: skip
    return {"runs": [run_json(r) for r in page], "next_cursor": next_cursor}


def _slots(request: Request) -> StreamSlots:
    slots: StreamSlots = request.app.state.stream_slots
    return slots


@router.get("/v1/runs/{run_id}/events", tags=["runs"])
async def run_events(
    run_id: str,
    request: Request,
    who: Reader,
    runs: Runs,
    hub: Hub,
    after: Annotated[str | None, Query(max_length=48)] = None,
    last_event_id: Annotated[str | None, Header(max_length=48)] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    for given in (after, last_event_id):  # each one given is checked, whichever is used
        if given is not None:
            check_event_id(given)
    start = last_event_id or after or START
    run = await runs.get(run_id, tenant=who)  # 404 before any stream starts
    ndjson = bool(accept and NDJSON in accept and "text/event-stream" not in accept)
    point = await resume_point(runs.redis, run_id, start, ended=run.status.terminal)
    if point.at_end:
        return event_response(_nothing(), ndjson=ndjson)
    release = _slots(request).take(who)  # a run token's stream counts for its run's tenant
    # The hub says whether the stream was trimmed past point.after, in one transaction with its
    # first read: a check made here, before, could be stale by then.
    return event_response(hub.stream(run_id, point.after), ndjson=ndjson, release=release)


async def _nothing() -> AsyncIterator[list[RawEntry]]:
    return
    yield  # an async generator that yields nothing


@router.post("/v1/runs/{run_id}/cancel", tags=["runs"])
async def cancel_run(run_id: str, request: Request, who: Tenant, runs: Runs) -> JSONResponse:
    run = await runs.get(run_id, tenant=who)
    if run.status.terminal and run.status is not RunStatus.CANCELLED:
        raise InvalidTransition(run_id, run.status.value, RunStatus.CANCELLED.value)
    if await runs.request_cancel(run_id) is RunStatus.CANCELLED and not run.status.terminal:
        await notify(runs.redis, request.app.state.settings, run_id)  # it ends here, not in a host
        quotas: Quotas = request.app.state.quotas
        await quotas.closed(who, run_id)  # its place in the tenant's quota is free at once
    run = await runs.get(run_id, tenant=who)
    return JSONResponse(run_json(run), status_code=200 if run.status.terminal else 202)


@router.post("/v1/runs/{run_id}/tokens", tags=["runs"])
async def mint_token(
    run_id: str, request: Request, who: Tenant, runs: Runs, tokens: Tokens
) -> dict[str, Any]:
    """A fresh run token for the run: body ``{"ttl": seconds, "scope": "read" | "answer"}``
    (both optional: at most GENX_TOKEN_TTL, the default; ``read``, the default, reads the run,
    ``answer`` also answers its input requests); returns ``{"token", "expires_at", "scope"}``."""
    run = await runs.get(run_id, tenant=who)
    body = await read_json(request, request.app.state.settings.max_body_bytes)
    if not isinstance(body, dict) or set(body) - {"ttl", "scope"}:
        raise UserError('the body must be a JSON object: {"ttl": seconds, "scope": ...} or {}')
    ttl, scope = body.get("ttl"), body.get("scope", READ)
    if ttl is not None:  # a JSON integer: 30 or 30.0, not "30" nor true nor 1.5
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl != int(ttl):
            raise UserError(f"ttl must be a whole number of seconds from 1 to {tokens.ttl}")
        ttl = int(ttl)
        if not 1 <= ttl <= tokens.ttl:
            raise UserError(f"ttl must be a whole number of seconds from 1 to {tokens.ttl}")
    if scope not in SCOPES:
        raise UserError(f"scope must be one of {list(SCOPES)}")
    token, expires_at = tokens.mint(run.id, run.tenant, ttl, scope)
    expires = datetime.fromtimestamp(expires_at, UTC).isoformat().replace("+00:00", "Z")
    return {"token": token, "expires_at": expires, "scope": scope}  # the run object's format


@router.post("/v1/runs/{run_id}/input", tags=["runs"])
async def send_input(run_id: str, request: Request, who: Answerer, runs: Runs) -> dict[str, Any]:
    """Answer a run waiting in ``wait_for_input``: body ``{"input": {...}}``, optionally with the
    ``input_id`` of its ``input.requested`` event. ``422`` naming the field when the input does
    not fit the schema it asked for, ``409`` when the run does not wait for input."""
    body = await read_json(request, request.app.state.settings.max_body_bytes)
    if not isinstance(body, dict) or "input" not in body:
        raise UserError('the body must be a JSON object: {"input": ..., "input_id": optional}')
    unknown = set(body) - {"input", "input_id"}
    if unknown:
        raise UserError(f"unknown body field(s) {sorted(unknown)}; expected 'input', 'input_id'")
    input_id = body.get("input_id")
    if input_id is not None and not isinstance(input_id, str):
        raise UserError("input_id must be a string")
    run = await runs.deliver_input(run_id, body["input"], input_id=input_id, tenant=who)
    return run_json(run)


def _rfc3339(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        with suppress(ValueError):
            return datetime.fromisoformat(value)
    raise InputInvalid.field("start_at", "not an RFC 3339 time (e.g. 2026-01-31T09:00:00Z)")


def _seconds(value: Any) -> float | None:
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    raise InputInvalid.field("delay_seconds", "not a number of seconds")


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
    too_deep = UserError(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # far deeper than the limit
        raise too_deep from None
    except ValueError:  # an integer of more digits than Python converts (sys.int_info)
        raise UserError(
            f"the body has a number of more than {MAX_DIGITS} digits: not a number any field takes"
        ) from None
    if nesting(value) > MAX_JSON_DEPTH:
        raise too_deep
    return value


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999: JSON has no infinity
        raise UserError(f"the body has a number out of range ({text[:32]})")
    return number


def _no_constant(text: str) -> Any:
    raise UserError(f"the body is not valid JSON: {text} is not a JSON value")


def nesting(value: Any) -> int:
    """How many arrays and objects deep JSON ``value`` nests (iteratively: measuring cannot
    overflow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend(
                (child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)
            )
    return deepest


async def _wait_for_end(hub: EventHub, runs: RunStore, run: Run, seconds: float) -> Run:
    async def until_terminal() -> None:
        async with aclosing(hub.stream(run.id, START)) as batches:  # unsubscribed at once
            async for batch in batches:
                if batch and batch[-1].terminal:
                    return

    deadline = time.monotonic() + seconds
    with suppress(TimeoutError):
        await asyncio.wait_for(until_terminal(), max(0.0, deadline - time.monotonic()))
    return await runs.get(run.id)
