"""The operator's routes: what a run did (its steps), doing it again (a rerun, from the start or
from a step), acting on many runs chosen by a filter (bulk cancel and rerun), counting runs by
status, and the cluster's state (``GET /v1/cluster``).

What must stay true:

- A rerun is a new run; the run it reruns is untouched but for the link to it (``reruns``). Its
  journal starts with what the original completed before ``from_step``
  (:func:`genx_ray.model.rerun_entries`), so those steps replay instead of running: no other
  path executes a rerun than the one every run takes. Only a run that ended is rerun (its
  journal is final). A rerun pays its tenant's quota like any start.
- Bulk actions see only the caller's tenant's runs (the search is the tenant's), and do nothing
  on a dry run. Under an ``Idempotency-Key`` a retried request does nothing twice: the first
  request's answer is kept (24 h) and returned again; a retry of one that died half way acts
  on the same runs (those created before the first request, not its own reruns), and each
  rerun is created under a key derived from the request's and the run's, so no run is rerun
  twice.

These routes are registered before :mod:`gateway.routes`'s: ``/v1/runs/bulk/cancel`` must not
be read as the cancel of a run named ``bulk``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from gateway.routes import (
    Reader,
    Runs,
    TagQuery,
    Tenant,
    TimeQuery,
    Tokens,
    Workflows,
    read_json,
    run_filter,
    run_json,
)
from genx_ray.flow import Registry
from genx_ray.model import (
    WHERE_IT_STOPPED,
    GenxError,
    IdempotencyConflict,
    InputInvalid,
    QuotaExceeded,
    Run,
    RunNotEnded,
    RunStatus,
    StepView,
    UserError,
    canonical_hash,
    first_failed,
    is_run_id,
    rerun_entries,
)
from genx_ray.store import Quotas, RunFilter, RunStore, cluster_state, keys, notify

router = APIRouter()

MAX_BULK = 10_000  # runs one bulk action acts on
MAX_IDS = 1000  # runs a bulk filter may name one by one
BULK_CONCURRENCY = 32  # runs acted on at once
IDEMPOTENCY_TTL = 24 * 3600
RERUN_FIELDS = {"from_step", "input"}
BULK_FIELDS = {"filter", "dry_run", "limit"}
FILTER_FIELDS = {"workflow", "status", "tag", "created_after", "created_before", "ids"}
FROM = ("failed_step", "start")
MAP_FIELDS = {"items", "done", "failed", "failed_items"}
IdempotencyKey = Annotated[str | None, Header(max_length=256)]  # one run's rerun


def step_json(step: StepView) -> dict[str, Any]:
    """A step as the API shows it: a map's counts only on a map."""
    return step.model_dump(mode="json", exclude=None if step.kind == "map" else MAP_FIELDS)


@router.get("/v1/runs/counts", tags=["runs"])
async def count_runs(
    who: Tenant,
    runs: Runs,
    workflow: str | None = None,
    tag: TagQuery = None,
    created_after: TimeQuery = None,
    created_before: TimeQuery = None,
) -> dict[str, Any]:
    """How many of the tenant's runs (filtered as ``GET /v1/runs``, status aside) are in each
    status: ``{"counts": {status: n}, "complete": bool}`` (False: over 10,000 runs fit, the
    newest 10,000 are counted)."""
    found = run_filter(workflow, None, tag, created_after, created_before)
    counts, complete = await runs.counts(tenant=who, found=found)
    return {"counts": counts, "complete": complete}


# -- bulk actions (before the routes of one run: "bulk" is no run id) -------------------------


def _idempotency_key(request: Request) -> str | None:
    """A bulk action's ``Idempotency-Key`` header (read here, not declared as a parameter: the
    OpenAPI document describes it in the route's text)."""
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 256:
        raise UserError("Idempotency-Key: 1 to 256 characters")
    return key


@router.post("/v1/runs/bulk/cancel", tags=["runs"])
async def bulk_cancel(request: Request, who: Tenant, runs: Runs) -> JSONResponse:
    """Cancel the tenant's runs a filter chooses: body ``{"filter": {"workflow", "status",
    "tag", "created_after", "created_before", "ids"}, "dry_run": false, "limit": 10000}``;
    answers ``{"matched", "done", "dry_run", "runs": [{"id", "status", "done"}]}`` (a run that
    ended already is matched, not done). With an ``Idempotency-Key`` header, a retried request
    is answered as the first was, and does nothing more."""
    body, found, ids, dry_run, limit = await _bulk_body(request, set())
    idempotency_key = _idempotency_key(request)

    async def cancel(run: Run) -> dict[str, Any]:
        if run.status.terminal or dry_run:
            return {"id": run.id, "status": run.status.value, "done": False}
        status = await runs.request_cancel(run.id)
        if status is RunStatus.CANCELLED:
            await notify(runs.redis, request.app.state.settings, run.id)
        return {"id": run.id, "status": status.value, "done": True}

    return await _bulk(request, "cancel", who, runs, body, found, ids, limit, idempotency_key,
                       dry_run, cancel)  # fmt: skip


@router.post("/v1/runs/bulk/rerun", tags=["runs"])
async def bulk_rerun(
    request: Request, who: Tenant, runs: Runs, registry: Workflows
) -> JSONResponse:
    """Rerun the tenant's runs a filter chooses (as ``bulk/cancel``), each ``"from":
    "failed_step"`` (the default: from its own first failed step, or, with none, going on
    from where it stopped) or ``"start"``; answers ``{"matched", "done", "dry_run", "runs":
    [{"id", "from_step", "rerun_id", "done"}]}``, a run that could not be rerun with its
    ``error``. Reruns pay the quota: past it, the runs left get ``quota_exceeded``. With an
    ``Idempotency-Key`` header, no run is rerun twice however often the request is retried."""
    body, found, ids, dry_run, limit = await _bulk_body(request, {"from"})
    idempotency_key = _idempotency_key(request)
    start = body.get("from", "failed_step")
    if start not in FROM:
        raise UserError(f"from must be one of {list(FROM)}")
    derived = f"bulk:{idempotency_key}" if idempotency_key else None
    digest = canonical_hash("bulk-rerun", body)
    refused: list[QuotaExceeded] = []

    async def rerun_it(run: Run) -> dict[str, Any]:
        out: dict[str, Any] = {"id": run.id, "from_step": None, "rerun_id": None, "done": False}
        try:
            if not run.status.terminal:
                raise RunNotEnded(run.id, run.status.value)
            if refused and not dry_run:
                raise refused[0]  # over quota: the runs left are not read either
            history = await runs.history(run.id) if start == "failed_step" else ([], {})
            if start == "failed_step":
                out["from_step"] = first_failed(history[0]) or WHERE_IT_STOPPED
            if dry_run:
                return out
            made, _ = await rerun_one(request, runs, registry, run, out["from_step"], None,
                                      derived, digest, history)  # fmt: skip
            out.update(rerun_id=made.id, done=True)
        except QuotaExceeded as exc:
            refused.append(exc)
            out["error"] = {"code": exc.code, "message": exc.message}
        except GenxError as exc:
            out["error"] = {"code": exc.code, "message": exc.message}
        return out

    return await _bulk(request, "rerun", who, runs, body, found, ids, limit, idempotency_key,
                       dry_run, rerun_it)  # fmt: skip


# -- one run ----------------------------------------------------------------------------------


@router.get("/v1/runs/{run_id}/steps", tags=["runs"])
async def run_steps(run_id: str, who: Reader, runs: Runs) -> dict[str, Any]:
    """The run's steps in the order its code called them, each with its status, attempts,
    timing, whether it was cached or reused, and its error; a map is one entry counting its
    items (and listing the failed ones)."""
    return {"steps": [step_json(s) for s in await runs.steps(run_id, tenant=who)]}


@router.post("/v1/runs/{run_id}/rerun", tags=["runs"], status_code=202)
async def rerun_run(
    run_id: str,
    request: Request,
    who: Tenant,
    runs: Runs,
    registry: Workflows,
    tokens: Tokens,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """A new run of the same workflow: body ``{"from_step": <step id> | null, "input": {...} |
    null}``. The steps the run completed before ``from_step`` are reused from its journal, not
    run again (none without ``from_step``: from the start); a map as ``from_step`` runs only its
    failed items again. ``input`` (checked against the workflow's schema: 422) replaces the
    run's. ``409`` for a run that has not ended, ``422`` for a step the run does not have."""
    body = await read_json(request, request.app.state.settings.max_body_bytes)
    if not isinstance(body, dict) or set(body) - RERUN_FIELDS:
        raise UserError('the body must be a JSON object: {"from_step": ..., "input": ...}')
    from_step = body.get("from_step")
    if from_step is not None and not isinstance(from_step, str):
        raise InputInvalid.field("from_step", "a step id (GET /v1/runs/{id}/steps) or null")
    original = await runs.get(run_id, tenant=who)
    digest = canonical_hash("rerun", body)
    rerun, replayed = await rerun_one(
        request, runs, registry, original, from_step, body.get("input"), idempotency_key, digest
    )
    headers = {"Location": f"/v1/runs/{rerun.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    out = {**run_json(rerun), "stream_token": tokens.mint(rerun.id, who)[0]}
    return JSONResponse(out, status_code=200 if replayed else 202, headers=headers)


async def rerun_one(
    request: Request,
    runs: RunStore,
    registry: Registry,
    original: Run,
    from_step: str | None,
    new_input: Any,
    key: str | None,
    digest: str,
    history: tuple[list[StepView], dict[str, str]] | None = None,
) -> tuple[Run, bool]:
    """Rerun ``original`` (see :func:`rerun_run`); the rerun, and whether ``key`` made it
    before. ``history``: its steps and journal, if read already (needed only to rerun from a
    step)."""
    if not original.status.terminal:
        raise RunNotEnded(original.id, original.status.value)
    wf = registry.get(original.workflow)  # 404 for a workflow this gateway does not serve
    payload = original.input if new_input is None else wf.encode_input(new_input)
    journal: dict[str, str] = {}
    if from_step is not None:
        steps, done = history or await runs.history(original.id)
        if from_step != WHERE_IT_STOPPED and from_step not in {s.id for s in steps}:
            raise InputInvalid.field(
                "from_step", f"run {original.id} has no step {from_step!r} (see its steps)"
            )
        journal = rerun_entries(done, from_step, steps)
    quotas: Quotas = request.app.state.quotas
    admitted = key is None or not await runs.redis.exists(
        keys.rerun_idempotency(original.tenant, original.id, key)
    )  # a replay is no new run: not counted
    if admitted:
        await quotas.admit(original.tenant)  # 429 over quota: nothing created
    rerun, replayed = await runs.rerun(
        original, payload, from_step=from_step, journal=journal, key=key, request_hash=digest
    )
    if replayed and admitted:
        await quotas.refund(original.tenant)
    if not replayed:
        await quotas.opened(original.tenant, rerun.id)
    return rerun, replayed


# -- doing the bulk work -----------------------------------------------------------------------


async def _bulk_body(
    request: Request, more: set[str]
) -> tuple[dict[str, Any], RunFilter, list[str] | None, bool, int]:
    """A bulk action's body, checked: (body, filter, ids, dry_run, limit)."""
    body = await read_json(request, request.app.state.settings.max_body_bytes)
    fields = BULK_FIELDS | more
    if not isinstance(body, dict) or set(body) - fields:
        raise UserError(f"the body must be a JSON object with fields among {sorted(fields)}")
    f = body.get("filter")
    if not isinstance(f, dict) or set(f) - FILTER_FIELDS:
        raise UserError(f"filter must be an object with fields among {sorted(FILTER_FIELDS)}")
    if not f or any(v in (None, [], "") for v in f.values()):
        raise UserError("filter: give at least one of " + ", ".join(sorted(FILTER_FIELDS)) +
                        ", none of them empty")  # fmt: skip
    found = run_filter(f.get("workflow"), f.get("status"), f.get("tag"),
                       f.get("created_after"), f.get("created_before"))  # fmt: skip
    ids = f.get("ids")
    if ids is not None and (
        not isinstance(ids, list)
        or len(ids) > MAX_IDS
        or not all(isinstance(i, str) and is_run_id(i) for i in ids)
    ):
        raise UserError(f"filter.ids: a list of at most {MAX_IDS} run ids")
    dry_run, limit = body.get("dry_run", False), body.get("limit", MAX_BULK)
    if not isinstance(dry_run, bool):
        raise UserError("dry_run must be true or false")
    # A JSON integer: 100 or 100.0, not "100" nor true nor 1.5.
    if isinstance(limit, bool) or not isinstance(limit, int | float) or limit != int(limit):
        raise UserError(f"limit must be a whole number from 1 to {MAX_BULK}")
    if not 1 <= limit <= MAX_BULK:
        raise UserError(f"limit must be a whole number from 1 to {MAX_BULK}")
    return body, found, ids, dry_run, int(limit)


async def _bulk(
    request: Request,
    action: str,
    who: str,
    runs: RunStore,
    body: dict[str, Any],
    found: RunFilter,
    ids: list[str] | None,
    limit: int,
    key: str | None,
    dry_run: bool,
    act: Callable[[Run], Awaitable[dict[str, Any]]],
) -> JSONResponse:
    """Find the runs, act on each (a few at once), answer; under an Idempotency-Key, once."""
    record_key = keys.bulk_idempotency(who, action, key) if key and not dry_run else None
    digest = canonical_hash(action, body)
    if record_key is not None:
        record: dict[str, Any] = {"hash": digest, "as_of": time.time()}
        if not await runs.redis.set(record_key, json.dumps(record), nx=True, ex=IDEMPOTENCY_TTL):
            held = json.loads(await runs.redis.get(record_key) or json.dumps(record))
            if held["hash"] != digest:
                raise IdempotencyConflict(
                    f"this Idempotency-Key was used with a different bulk {action} request"
                )
            if "result" in held:
                headers = {"Idempotent-Replayed": "true"}
                return JSONResponse(held["result"], headers=headers)
            record = held
        # What existed when the first request came: not the reruns it made itself.
        before = min(found.created_before or float("inf"), float(record["as_of"]))
        found = RunFilter(found.workflow, found.status, found.tags, found.created_after, before)
    matched = await runs.find(found, tenant=who, limit=limit, ids=ids)
    results: list[dict[str, Any]] = [{} for _ in matched]
    todo = iter(range(len(matched)))

    async def worker() -> None:  # a few runs in flight at once, each its own round trips
        for i in todo:
            results[i] = await act(matched[i])

    await asyncio.gather(*(worker() for _ in range(min(BULK_CONCURRENCY, len(matched)))))
    result = {
        "matched": len(matched),
        "done": sum(1 for r in results if r.get("done")),
        "dry_run": dry_run,
        "runs": results,
    }
    if record_key is not None:
        record = {"hash": digest, "as_of": record["as_of"], "result": result}
        await runs.redis.set(record_key, json.dumps(record), xx=True, keepttl=True)
    return JSONResponse(result)


@router.get("/v1/cluster", tags=["ops"])
async def cluster(request: Request, _: Tenant) -> dict[str, Any]:
    """The workers (deployment, alive, draining, runs) and their run hosts (runs held, age),
    the run queue (depth, oldest entry's age), the runs holding a lease, and each LLM budget's
    use against its limits (``GENX_LLM_LIMITS``)."""
    settings = request.app.state.settings
    return await cluster_state(request.app.state.redis, settings.llm_limits)
