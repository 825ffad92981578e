"""Schedules over HTTP: ``POST/GET /v1/schedules``, ``GET/DELETE /v1/schedules/{id}``, and
``POST /v1/schedules/{id}/pause`` and ``/resume``.

A schedule starts a run of a workflow at each tick of a cron expression in a time zone; the
timer service of the workers (:mod:`genx_ray.service._timers`) starts exactly one run per tick.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from gateway.routes import Tenant, Workflows, read_json
from genx_ray.model import UserError
from genx_ray.store import Schedule, ScheduleStore, check

router = APIRouter(tags=["schedules"])
FIELDS = {"workflow", "cron", "input", "timezone"}


async def _schedules(request: Request) -> ScheduleStore:
    return ScheduleStore(request.app.state.redis)


Schedules = Annotated[ScheduleStore, Depends(_schedules)]


def schedule_json(schedule: Schedule) -> dict[str, Any]:
    return schedule.model_dump(mode="json", exclude={"tenant"})


@router.post("/v1/schedules", status_code=201)
async def create_schedule(
    request: Request, who: Tenant, schedules: Schedules, registry: Workflows
) -> Response:
    """Body ``{"workflow", "cron", "input", "timezone"}`` (``timezone`` defaults to UTC). A bad
    cron expression or time zone, or an input that does not fit the workflow: ``422`` naming
    the field; an unknown workflow: ``404``."""
    body = await read_json(request, request.app.state.settings.max_body_bytes)
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
    check(cron, timezone)
    payload = registry.get(workflow).encode_input(body.get("input"))
    schedule = await schedules.create(workflow, cron, payload, timezone=timezone, tenant=who)
    return JSONResponse(
        schedule_json(schedule),
        status_code=201,
        headers={"Location": f"/v1/schedules/{schedule.id}"},
    )


@router.get("/v1/schedules")
async def list_schedules(who: Tenant, schedules: Schedules) -> list[dict[str, Any]]:
    return [schedule_json(s) for s in await schedules.list(tenant=who)]


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
