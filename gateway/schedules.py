"""Schedules over HTTP: ``POST/GET /v1/schedules``, ``GET/DELETE /v1/schedules/{id}``, and
``POST /v1/schedules/{id}/pause`` and ``/resume``.

A schedule starts a run of a workflow at each tick of a cron expression in a time zone; the
timer service of the workers (:mod:`genx_ray.service._timers`) starts at most one run per tick,
admitted through the tenant's quota like a POST. A tenant has at most its ``schedules`` limit
(429 ``quota_exceeded`` past it), and a cron ticks at most every GENX_SCHEDULE_MIN_INTERVAL
seconds (422 naming ``cron``). The list is paginated: ``limit`` and ``cursor`` (the previous
page's ``Genx-Next-Cursor`` header, also in its ``Link: <...>; rel="next"``).
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from gateway.routes import Tenant, Workflows, read_json
from genx_ray.model import InputInvalid, UserError
from genx_ray.store import Quotas, Schedule, ScheduleStore, check

router = APIRouter(tags=["schedules"])
FIELDS = {"workflow", "cron", "input", "timezone", "overlap"}
OVERLAPS = ("skip", "allow")
NEXT_CURSOR = "Genx-Next-Cursor"


async def _schedules(request: Request) -> ScheduleStore:
    return ScheduleStore(request.app.state.redis)


Schedules = Annotated[ScheduleStore, Depends(_schedules)]


def schedule_json(schedule: Schedule) -> dict[str, Any]:
    return schedule.model_dump(mode="json", exclude={"tenant"})


@router.post("/v1/schedules", status_code=201)
async def create_schedule(
    request: Request, who: Tenant, schedules: Schedules, registry: Workflows
) -> Response:
    """Body ``{"workflow", "cron", "input", "timezone", "overlap"}`` (``timezone`` defaults to
    UTC; ``overlap``: ``skip``, the default, starts no run while the schedule's previous run is
    open, ``allow`` always starts one). A bad cron expression (or one with no tick to come, or
    ticking more often than GENX_SCHEDULE_MIN_INTERVAL) or time zone, or an input that does not
    fit the workflow: ``422`` naming the field; an unknown workflow: ``404``; the tenant at its
    ``schedules`` limit: ``429``."""
    settings = request.app.state.settings
    body = await read_json(request, settings.max_body_bytes)
    if not isinstance(body, dict):
        raise UserError('the body must be a JSON object: {"workflow", "cron", "input", "timezone"}')
    unknown, missing = set(body) - FIELDS, {"workflow", "cron"} - set(body)
    if unknown or missing:
        raise UserError(
            f"expected fields {sorted(FIELDS)} ('workflow' and 'cron' required); "
            f"unknown {sorted(unknown)}, missing {sorted(missing)}"
        )
    workflow, cron, timezone = body["workflow"], body["cron"], body.get("timezone", "UTC")
    if not all(isinstance(v, str) for v in (workflow, cron, timezone)):
        raise UserError("workflow, cron and timezone must be strings")
    overlap = body.get("overlap", "skip")
    if overlap not in OVERLAPS:
        raise InputInvalid.field("overlap", f"expected one of {list(OVERLAPS)}")
    check(cron, timezone, min_interval=settings.schedule_min_interval)
    payload = registry.get(workflow).encode_input(body.get("input"))
    quotas: Quotas = request.app.state.quotas
    schedule = await schedules.create(
        workflow, cron, payload, timezone=timezone, tenant=who, overlap=overlap,
        most=quotas.most_schedules(who), min_interval=settings.schedule_min_interval,
    )  # fmt: skip
    return JSONResponse(
        schedule_json(schedule),
        status_code=201,
        headers={"Location": f"/v1/schedules/{schedule.id}"},
    )


@router.get("/v1/schedules")
async def list_schedules(
    who: Tenant,
    schedules: Schedules,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> Response:
    """The tenant's schedules, oldest first, a page at a time: the next page's cursor is in the
    ``Genx-Next-Cursor`` header (and ``Link: <...>; rel="next"``), absent on the last page."""
    page, next_cursor = await schedules.page(tenant=who, limit=limit, cursor=cursor)
    headers = {}
    if next_cursor is not None:
        query = urlencode({"limit": limit, "cursor": next_cursor})
        headers = {NEXT_CURSOR: next_cursor, "Link": f'</v1/schedules?{query}>; rel="next"'}
    return JSONResponse([schedule_json(s) for s in page], headers=headers)


@router.get("/v1/schedules/{schedule_id}")
async def get_schedule(schedule_id: str, who: Tenant, schedules: Schedules) -> dict[str, Any]:
    return schedule_json(await schedules.get(schedule_id, tenant=who))


@router.delete("/v1/schedules/{schedule_id}", status_code=204)
async def delete_schedule(schedule_id: str, who: Tenant, schedules: Schedules) -> Response:
    """No more runs start from it; runs it already started go on."""
    await schedules.delete(schedule_id, tenant=who)
    return Response(status_code=204)


@router.post("/v1/schedules/{schedule_id}/pause")
async def pause_schedule(schedule_id: str, who: Tenant, schedules: Schedules) -> dict[str, Any]:
    """Its ticks pass without starting a run (``"paused": true``) until it is resumed."""
    return schedule_json(await schedules.set_paused(schedule_id, True, tenant=who))


@router.post("/v1/schedules/{schedule_id}/resume")
async def resume_schedule(schedule_id: str, who: Tenant, schedules: Schedules) -> dict[str, Any]:
    """It starts runs again from its next tick (the ticks missed meanwhile start none)."""
    return schedule_json(await schedules.set_paused(schedule_id, False, tenant=who))
