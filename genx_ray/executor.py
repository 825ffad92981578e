"""Executing one attempt of a run: claim it, replay its journal, run the body, record the end.

Used by every process that executes runs (see :class:`genx_ray.runtime.Runtime`): run hosts,
an inline worker, ``genx_ray.start`` in a script. Many attempts share the process's Redis
client, batch writer and lease renewer; each attempt is one asyncio task with its own context.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from genx_ray import keys, lua
from genx_ray.context import JournalEntry, RunContext, run_scope
from genx_ray.errors import Fenced, GenxError, InvalidTransition, RunCancelled, RunNotFound
from genx_ray.events import (
    ErrorInfo,
    RunCancelledEvent,
    RunFailedEvent,
    RunStartedEvent,
    RunSucceededEvent,
)
from genx_ray.status import RunStatus
from genx_ray.values import dumps
from genx_ray.webhooks import notify

if TYPE_CHECKING:
    from genx_ray.runtime import Runtime

log = logging.getLogger("genx_ray.executor")
HOST_ID = f"{socket.gethostname()}:{os.getpid()}"
SKIPPED = "skipped"  # what an attempt that was not to run (cancelled, taken, superseded) returns


@dataclass(eq=False)
class Attempt:
    """An attempt this process executes: what the runtime's signals act on."""

    run_id: str
    attempt: int | None
    task: asyncio.Task[Any] | None = None
    ctx: RunContext | None = None
    cancel_asked: bool = False  # a cancel arrived (maybe before the body started)
    lost: bool = False  # superseded: another attempt owns the run now
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def cancel(self) -> None:
        self.cancel_asked = True
        if self.ctx is not None:
            self.ctx.cancel_requested = True
        if self.task is not None:
            self.task.cancel()

    def lose(self) -> None:
        self.lost = True
        if self.task is not None:
            self.task.cancel()


async def execute(
    rt: Runtime,
    run_id: str,
    worker: str,
    *,
    attempt: int | None = None,
    workflow: str | None = None,
    extra: dict[str, str] | None = None,
) -> str | None:
    """Run ``attempt`` of ``run_id`` (status ``queued``) to its end. Returns the final status,
    :data:`SKIPPED` when the run was not this attempt's to run (cancelled while queued, taken by
    another, superseded), or None when the attempt lost its claim while running (another attempt
    owns the run: this one wrote nothing more). Without ``attempt`` and ``workflow`` (which the
    queue entry usually carries), they are read from the run."""
    if attempt is None or workflow is None:
        raw_attempt, raw_workflow = await rt.redis.hmget(keys.run(run_id), "attempt", "workflow")
        if raw_attempt is None:
            return SKIPPED
        attempt, workflow = int(raw_attempt), str(raw_workflow)
    me = Attempt(run_id, attempt)
    while (other := rt.active.setdefault(run_id, me)) is not me:
        if other.attempt is not None and other.attempt >= attempt:
            return SKIPPED  # this process runs it already (a duplicate delivery)
        other.lose()  # an older attempt still here (this process was frozen): the new one wins
        await other.done.wait()
    try:
        return await _execute(rt, me, attempt, workflow, worker, extra or {})
    finally:
        me.done.set()
        if rt.active.get(run_id) is me:
            del rt.active[run_id]


async def _execute(
    rt: Runtime, me: Attempt, attempt: int, workflow: str, worker: str, extra: dict[str, str]
) -> str | None:
    run_id, settings = me.run_id, rt.settings
    leased = rt.leases is not None
    fields = {
        "started_at": repr(time.time()), "worker": worker, "host": HOST_ID,
        "version": settings.deployment, **extra,  # the deployment that runs (and resumes) it
    }  # fmt: skip
    started = RunStartedEvent(run_id=run_id, workflow=workflow, attempt=attempt, worker=worker)
    try:
        run, raw_journal = await rt.runs.claim(
            run_id, attempt, started, fields, settings.lease_seconds if leased else None,
            watch=leased,
        )  # fmt: skip
    except (InvalidTransition, RunNotFound, Fenced):
        return SKIPPED
    if rt.leases is not None:
        rt.leases.hold(run_id, attempt)
    try:
        journal = {k: JournalEntry.loads(v) for k, v in raw_journal.items()}
        writer = rt.writes.writer(run_id, attempt)
        ctx = RunContext(run_id, run.workflow, attempt, rt.redis, writer, journal)
        ctx.cancel_requested = me.cancel_asked or run.cancel_requested
        me.ctx = ctx
        status = await _finish(rt, me, ctx, run.workflow, run.input)
        if status is not None:
            await notify(rt.redis, settings, run_id)
        return status.value if status is not None else None
    finally:
        # Released only once the run has its terminal status (or was handed on): a crash before
        # that leaves the lease to expire, and the supervisor restarts the run.
        if rt.leases is not None:
            rt.leases.drop(run_id, attempt)
            await release_lease(rt.redis, run_id, attempt)


async def release_lease(client: Any, run_id: str, attempt: int) -> None:
    try:
        if await lua.RELEASE(client, [keys.lease(run_id)], [attempt]):
            await client.zrem(keys.LEASES, run_id)
    except Exception as exc:  # the lease expires by itself
        log.warning("run %s: lease release failed (%s)", run_id, exc)


async def _finish(
    rt: Runtime, me: Attempt, ctx: RunContext, workflow: str, raw_input: Any
) -> RunStatus | None:
    try:
        outcome = await _run_body(rt, me, ctx, workflow, raw_input)
    finally:
        await ctx.writer.close()
    if outcome is None or ctx.writer.fenced:
        return None
    status, fields, final_event = outcome
    try:
        await rt.runs.finish(ctx.run_id, ctx.attempt, status, final_event, fields)
    except (Fenced, InvalidTransition, RunNotFound):
        return None
    return status


async def _run_body(
    rt: Runtime, me: Attempt, ctx: RunContext, workflow: str, raw_input: Any
) -> tuple[RunStatus, dict[str, str], Any] | None:
    """The run's outcome: status, fields and terminal event; None when this attempt lost its
    lease or was fenced (another attempt owns the run: write nothing more)."""
    run_id = ctx.run_id
    try:
        wf = rt.registry.get(workflow)
        inp = wf.parse_input(raw_input)
    except GenxError as exc:
        return _failed(run_id, exc)

    async def body() -> Any:
        with run_scope(ctx):
            return await wf.invoke(inp)

    me.task = asyncio.create_task(body(), name=f"genx-run-{run_id}")
    if ctx.cancel_requested:
        me.task.cancel()
    try:
        output = wf.output.encode(await me.task)
        if ctx.cancel_requested:  # finished in the same instant it was cancelled: honour cancel
            raise RunCancelled(run_id)
        await ctx.writer.flush()
        return (
            RunStatus.SUCCEEDED,
            {"output": dumps(output)},
            RunSucceededEvent(run_id=run_id, output=output),
        )
    except (asyncio.CancelledError, RunCancelled):
        if me.lost:
            return None
        if not ctx.cancel_requested:
            raise  # the process itself is being torn down: not the user's cancel
        return _cancelled(run_id)
    except Fenced:
        return None
    except Exception as exc:
        if ctx.cancel_requested:
            return _cancelled(run_id)
        return _failed(run_id, exc)


def _cancelled(run_id: str) -> tuple[RunStatus, dict[str, str], Any]:
    return RunStatus.CANCELLED, {}, RunCancelledEvent(run_id=run_id, reason="cancel requested")


def _failed(run_id: str, exc: BaseException) -> tuple[RunStatus, dict[str, str], Any]:
    error = ErrorInfo.from_exception(exc)
    return (
        RunStatus.FAILED,
        {"error": error.model_dump_json()},
        RunFailedEvent(run_id=run_id, error=error),
    )
