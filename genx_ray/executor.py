"""Executing one attempt of a run: claim it, replay its journal, run the body, record the end.

Used by every process that executes runs (see :class:`genx_ray.runtime.Runtime`): run hosts,
an inline worker, ``genx_ray.start`` in a script. Many attempts share the process's Redis
client, batch writer and lease renewer; each attempt is one asyncio task with its own context.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from genx_ray import keys, metrics, tracing
from genx_ray.children import outcome_entry
from genx_ray.context import JournalEntry, RunContext, run_scope
from genx_ray.errors import Fenced, GenxError, InvalidTransition, RunCancelled, RunNotFound
from genx_ray.events import (
    ChildFinishedEvent,
    ErrorInfo,
    RunCancelledEvent,
    RunFailedEvent,
    RunResumedEvent,
    RunStartedEvent,
    RunSucceededEvent,
    StepRef,
)
from genx_ray.runs import Claim, Run
from genx_ray.status import RunStatus
from genx_ray.values import dumps
from genx_ray.waits import Parked
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
    task: asyncio.Task[Any] | None = None  # the workflow body
    runner: asyncio.Task[str | None] | None = None  # the whole attempt, after its claim
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


async def start(
    rt: Runtime,
    run_id: str,
    worker: str,
    *,
    attempt: int | None = None,
    workflow: str | None = None,
) -> Attempt | None:
    """Claim ``attempt`` of ``run_id`` (status ``queued``); once claimed, the attempt runs on in
    a task of its own (``Attempt.runner``, whose result is the final status, or None when the
    attempt lost its claim while running). None when the run was not this attempt's to run
    (cancelled while queued, taken by another, superseded). Without ``attempt`` and
    ``workflow`` (which the queue entry usually carries), they are read from the run."""
    (me,) = await start_many(rt, [(run_id, attempt, workflow)], worker)
    return me


async def start_many(
    rt: Runtime, runs: list[tuple[str, int | None, str | None]], worker: str
) -> list[Attempt | None]:
    """:func:`start` for many (run id, attempt, workflow) at once: their claims in one
    pipeline."""
    known = [await _known(rt, *run) for run in runs]
    mine: list[tuple[Attempt, str]] = []
    for item in known:
        if item is not None and (me := await _take(rt, item[0], item[1])) is not None:
            mine.append((me, item[2]))
    leased = rt.leases is not None
    claims = [
        Claim(me.run_id, me.attempt or 0,
              RunStartedEvent(run_id=me.run_id, workflow=wf, attempt=me.attempt, worker=worker),
              {"started_at": repr(time.time()), "worker": worker, "host": HOST_ID,
               # the deployment that runs (and resumes) it
               "version": rt.settings.deployment})
        for me, wf in mine
    ]  # fmt: skip
    results = await rt.runs.claim_many(
        claims, rt.settings.lease_seconds if leased else None, watch=leased
    )
    started: dict[str, Attempt] = {}
    for (me, _), result in zip(mine, results, strict=True):
        if isinstance(result, InvalidTransition | RunNotFound | Fenced):
            _forget(rt, me)
            continue
        if isinstance(result, Exception):
            _forget(rt, me)
            raise result
        if rt.leases is not None:
            rt.leases.hold(me.run_id, me.attempt or 0)
        metrics.run_started(result[0].workflow)
        me.runner = asyncio.create_task(_run(rt, me, *result), name=f"genx-attempt-{me.run_id}")
        started[me.run_id] = me
    return [started.get(run[0]) for run in runs]


async def _known(
    rt: Runtime, run_id: str, attempt: int | None, workflow: str | None
) -> tuple[str, int, str] | None:
    """The run's attempt and workflow, read from the run if the caller did not say."""
    if attempt is not None and workflow is not None:
        return run_id, attempt, workflow
    raw_attempt, raw_workflow = await rt.redis.hmget(keys.run(run_id), "attempt", "workflow")
    if raw_attempt is None:
        return None
    return run_id, int(raw_attempt), str(raw_workflow)


async def _take(rt: Runtime, run_id: str, attempt: int) -> Attempt | None:
    """Register the attempt in this process; None if this process runs it already. A newer
    attempt of a run an older one still runs here (this process was frozen) supersedes it."""
    me = Attempt(run_id, attempt)
    while (other := rt.active.setdefault(run_id, me)) is not me:
        if other.attempt is not None and other.attempt >= attempt:
            return None  # a duplicate delivery
        other.lose()
        await other.done.wait()
    return me


async def execute(
    rt: Runtime,
    run_id: str,
    worker: str,
    *,
    attempt: int | None = None,
    workflow: str | None = None,
) -> str | None:
    """:func:`start`, then wait for the attempt's end: the final status, :data:`SKIPPED`, or
    None (lost)."""
    me = await start(rt, run_id, worker, attempt=attempt, workflow=workflow)
    if me is None or me.runner is None:
        return SKIPPED
    return await me.runner


async def _start_here(rt: Runtime, run_id: str, workflow: Any) -> None:
    """A child of a run started from a script: it runs in the same process (workers may not
    have its code)."""
    rt.registry.add(workflow)
    await start(rt, run_id, "local", attempt=1, workflow=workflow.name)


def _forget(rt: Runtime, me: Attempt) -> None:
    me.done.set()
    if rt.active.get(me.run_id) is me:
        del rt.active[me.run_id]


async def _run(rt: Runtime, me: Attempt, run: Run, raw_journal: dict[str, str]) -> str | None:
    run_id, attempt = me.run_id, run.attempt
    # The attempt's span: the parent of its steps' spans (the body's task inherits it).
    span = tracing.attempt_span(run, len(raw_journal))
    try:
        with tracing.activated(span):
            journal = {k: JournalEntry.loads(v) for k, v in raw_journal.items()}
            writer = rt.writes.writer(run_id, attempt)
            ctx = RunContext(
                run_id, run.workflow, attempt, rt.redis, writer, journal, tenant=run.tenant,
                origin=run.origin or "", start_here=functools.partial(_start_here, rt),
            )  # fmt: skip
            ctx.cancel_requested = me.cancel_asked or run.cancel_requested
            me.ctx = ctx
            status = await _finish(rt, me, ctx, run.workflow, run.input)
            tracing.attempt_done(span, status.value if status is not None else None)
            if status is not None and status.terminal:
                metrics.run_finished(run.workflow, status.value)
                await notify(rt.redis, rt.settings, run_id)
                if run.parent_id and run.parent_step:
                    await tell_parent(rt.runs, run_id, run.parent_id, run.parent_step)
            return status.value if status is not None else None
    finally:
        # The lease goes with the terminal status (lua.FINISH). An attempt stopped any other way
        # (superseded, or this process torn down) keeps it until it expires: then the supervisor
        # restarts the run, unless another attempt already owns it.
        if rt.leases is not None:
            rt.leases.drop(run_id, attempt)
        _forget(rt, me)


async def _finish(
    rt: Runtime, me: Attempt, ctx: RunContext, workflow: str, raw_input: Any
) -> RunStatus | None:
    try:
        outcome = await _run_body(rt, me, ctx, workflow, raw_input)
    except BaseException:
        await ctx.writer.close()
        raise
    if outcome is None or ctx.writer.fenced:
        await ctx.writer.close()
        return None
    if isinstance(outcome, Parked):
        return await _park(rt, ctx, outcome)
    status, fields, final_event = outcome
    fields["finished_at"] = repr(time.time())
    try:
        # After the run's last events, in the same pipeline: status, event, lease released.
        await ctx.writer.finish(status.value, final_event, fields, leased=rt.leases is not None)
    except (Fenced, InvalidTransition, RunNotFound):
        return None
    return status


async def _park(rt: Runtime, ctx: RunContext, parked: Parked) -> RunStatus | None:
    """The body parked the run on a wait: ``waiting`` (as its next attempt), holding nothing;
    the timer service looks at it when ``parked.due`` comes."""
    leased = rt.leases is not None
    try:
        outcome = await ctx.writer.park(
            parked.step, parked.events, parked.fields,
            ready_if_journaled=parked.ready_if_journaled, leased=leased,
        )  # fmt: skip
    except (Fenced, InvalidTransition, RunNotFound):
        return None
    if outcome == "ready":  # what it would wait for came meanwhile: run again from the journal
        with contextlib.suppress(Fenced, InvalidTransition, RunNotFound):
            await rt.runs.requeue(ctx.run_id, ctx.attempt, f"{parked.kind} ready")
        return RunStatus.QUEUED
    if parked.due is not None:
        await rt.redis.zadd(keys.TIMERS, {ctx.run_id: parked.due})
    return RunStatus.WAITING


async def tell_parent(runs: Any, run_id: str, parent_id: str, parent_step: str) -> int:
    """Deliver an ended child run's outcome to its parent (once, whoever calls)."""
    run = await runs.get(run_id)
    error = run.error.model_dump(exclude={"traceback"}) if run.error else None
    entry = outcome_entry(run.status.value, run.output, error)
    ref = StepRef(id=parent_step, name="child")
    finished = ChildFinishedEvent(run_id=parent_id, child_id=run_id, status=run.status.value,
                                  step=ref)  # fmt: skip
    attempt = int(await runs.redis.hget(keys.run(parent_id), "attempt") or 0)
    resumed = RunResumedEvent(run_id=parent_id, attempt=attempt, reason=f"child run {run.status}")
    result: int = await runs.child_done(parent_id, parent_step, entry, finished, resumed)
    return result


async def _run_body(
    rt: Runtime, me: Attempt, ctx: RunContext, workflow: str, raw_input: Any
) -> tuple[RunStatus, dict[str, str], Any] | Parked | None:
    """The run's outcome: status, fields and terminal event (or where it parked); None when
    this attempt lost its lease or was fenced (another attempt owns the run: write nothing
    more)."""
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
    except Parked as parked:
        if ctx.cancel_requested:
            return _cancelled(run_id)
        return parked
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
