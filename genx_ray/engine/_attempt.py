"""One attempt of a run, executing in an :class:`~genx_ray.engine.Executor`: replay
its journal, run the workflow body, record how it ended.

An attempt is claimed by its executor (its run moves to ``running`` under this attempt's number,
with the journal in the same round trip), then runs on as an asyncio task of its own
(:attr:`Attempt.runner`), with its own :class:`~genx_ray.flow.RunContext` and fenced writer.
It ends in one of four ways: a terminal status (written with its event and the lease released in
one script), parked on a durable wait (``waiting``, holding nothing), lost (another attempt owns
the run now: it writes nothing more), or torn down with its process (its lease expires and the
supervisor restarts the run). Signals reach it through :meth:`Attempt.cancel` and
:meth:`Attempt.lose`, from any thread via its executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from genx_ray.flow import Parked, RunContext, outcome_entry, run_scope
from genx_ray.model import (
    ChildFinishedEvent,
    ErrorInfo,
    Fenced,
    GenxError,
    InvalidTransition,
    JournalEntry,
    Run,
    RunCancelled,
    RunCancelledEvent,
    RunFailedEvent,
    RunNotFound,
    RunResumedEvent,
    RunStatus,
    RunSucceededEvent,
    StepRef,
    dump_value,
    redact_json,
)
from genx_ray.store import RunStore, keys, notify

if TYPE_CHECKING:
    from genx_ray.engine._executor import Executor

log = logging.getLogger("genx_ray.executor")
# This process, as a run record's ``host`` field names it.
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}"

# How an attempt's body ended: (status, fields of the record, the terminal event), or where it
# parked, or None (lost: another attempt owns the run).
Outcome = tuple[RunStatus, dict[str, str], Any] | Parked | None


class Attempt:
    """An attempt this process executes: what its executor's signals act on."""

    def __init__(self, executor: Executor, run_id: str, attempt: int) -> None:
        self.executor = executor
        self.run_id = run_id
        self.attempt = attempt
        self.task: asyncio.Task[Any] | None = None  # the workflow body
        self.runner: asyncio.Task[str | None] | None = None  # the whole attempt, once claimed
        self.ctx: RunContext | None = None
        self.cancel_asked = False  # a cancel arrived (maybe before the body started)
        self.lost = False  # superseded: another attempt owns the run now
        self.done = asyncio.Event()

    # -- signals --------------------------------------------------------------------------------

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

    # -- the attempt ----------------------------------------------------------------------------

    def begin(self, run: Run, journal: dict[str, str]) -> None:
        """Go on executing the claimed run in a task of its own (:attr:`runner`), whose result
        is the final status (None: lost)."""
        self.runner = asyncio.create_task(self._run(run, journal), name=f"genx-attempt-{run.id}")

    async def _run(self, run: Run, raw_journal: dict[str, str]) -> str | None:
        ex = self.executor
        try:
            # The attempt's observation: the parent of its steps' (the body's task inherits it).
            with ex.observer.attempt(run, len(raw_journal)) as observed:
                journal = {k: JournalEntry.loads(v) for k, v in raw_journal.items()}
                ctx = RunContext(
                    self.run_id, run.workflow, run.attempt, ex.redis,
                    ex.writes.writer(self.run_id, run.attempt, tenant=run.tenant), journal,
                    tenant=run.tenant, tags=run.tags, origin=run.origin or "",
                    start_here=ex.start_child_here, observer=ex.observer,
                )  # fmt: skip
                ctx.cancel_requested = self.cancel_asked or run.cancel_requested
                self.ctx = ctx
                status = await self._finish(ctx, run.workflow, run.input)
                observed.ended(status=status.value if status is not None else None)
                if status is not None and status.terminal:
                    await notify(ex.redis, ex.settings, self.run_id)
                    if run.parent_id and run.parent_step:
                        await tell_parent(ex.runs, self.run_id, run.parent_id, run.parent_step)
                return status.value if status is not None else None
        finally:
            # The lease goes with the terminal status (scripts.FINISH). An attempt stopped any
            # other way (superseded, or this process torn down) keeps it until it expires: then
            # the supervisor restarts the run, unless another attempt already owns it.
            if ex.leases is not None:
                ex.leases.drop(self.run_id, run.attempt)
            ex.forget(self)

    async def _finish(self, ctx: RunContext, workflow: str, raw_input: Any) -> RunStatus | None:
        try:
            outcome = await self._body(ctx, workflow, raw_input)
        except BaseException:
            await ctx.writer.close()
            raise
        if outcome is None or ctx.writer.fenced:
            await ctx.writer.close()
            return None
        if isinstance(outcome, Parked):
            return await self._park(ctx, outcome)
        status, fields, final_event = outcome
        fields["finished_at"] = repr(time.time())
        leased = self.executor.leases is not None
        try:
            # After the run's last events, in the same pipeline: status, event, lease released.
            await ctx.writer.finish(status.value, final_event, fields, leased=leased)
        except (Fenced, InvalidTransition, RunNotFound):
            return None
        return status

    async def _park(self, ctx: RunContext, parked: Parked) -> RunStatus | None:
        """The body parked the run on a wait: ``waiting`` (as its next attempt), holding
        nothing; the timer service looks at it when ``parked.due`` comes."""
        ex = self.executor
        try:
            outcome = await ctx.writer.park(
                parked.step, parked.events, parked.fields,
                ready_if_journaled=parked.ready_if_journaled, leased=ex.leases is not None,
            )  # fmt: skip
        except (Fenced, InvalidTransition, RunNotFound):
            return None
        if outcome == "ready":  # what it would wait for came meanwhile: run again from the journal
            with contextlib.suppress(Fenced, InvalidTransition, RunNotFound):
                await ex.runs.requeue(ctx.run_id, ctx.attempt, f"{parked.kind} ready")
            return RunStatus.QUEUED
        if parked.due is not None:
            await ex.redis.zadd(keys.TIMERS, {ctx.run_id: parked.due})
        return RunStatus.WAITING

    async def _body(self, ctx: RunContext, workflow: str, raw_input: Any) -> Outcome:
        """The run's outcome: status, fields and terminal event (or where it parked); None when
        this attempt lost its lease or was fenced (another attempt owns the run: write nothing
        more)."""
        run_id = ctx.run_id
        try:
            wf = self.executor.registry.get(workflow)
            inp = wf.parse_input(raw_input)
        except GenxError as exc:
            return _failed(run_id, exc)

        async def body() -> Any:
            with run_scope(ctx):
                return await wf.invoke(inp)

        self.task = asyncio.create_task(body(), name=f"genx-run-{run_id}")
        if ctx.cancel_requested:
            self.task.cancel()
        try:
            output = wf.output.encode(await self.task)
            if ctx.cancel_requested:  # finished in the same instant it was cancelled: cancel
                raise RunCancelled(run_id)
            await ctx.writer.flush()
            return (
                RunStatus.SUCCEEDED,
                {"output": redact_json(dump_value(output))},  # as its event: no secret kept
                RunSucceededEvent(run_id=run_id, output=output),
            )
        except Parked as parked:
            if ctx.cancel_requested:
                return _cancelled(run_id)
            return parked
        except (asyncio.CancelledError, RunCancelled):
            if self.lost:
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


async def tell_parent(runs: RunStore, run_id: str, parent_id: str, parent_step: str) -> int:
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


def _cancelled(run_id: str) -> tuple[RunStatus, dict[str, str], Any]:
    return RunStatus.CANCELLED, {}, RunCancelledEvent(run_id=run_id, reason="cancel requested")


def _failed(run_id: str, exc: BaseException) -> tuple[RunStatus, dict[str, str], Any]:
    error = ErrorInfo.from_exception(exc)
    return (
        RunStatus.FAILED,
        {"error": error.model_dump_json()},
        RunFailedEvent(run_id=run_id, error=error),
    )
