"""Executing one attempt of a run: claim it, replay its journal, run the body, record the end.

Used by every place a run executes: the worker's run hosts and ``genx_ray.start`` in a script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

import redis.asyncio

from genx_ray import keys
from genx_ray.context import JournalEntry, RunContext, run_scope
from genx_ray.errors import Fenced, GenxError, InvalidTransition, RunCancelled
from genx_ray.events import ErrorInfo, RunFailed, RunStarted, RunSucceeded
from genx_ray.events import RunCancelled as RunCancelledEvent
from genx_ray.lease import Lease
from genx_ray.runs import Run, RunStatus, RunStore
from genx_ray.settings import Settings
from genx_ray.streams import EventStore
from genx_ray.values import dumps
from genx_ray.webhooks import notify
from genx_ray.workflow import Registry
from genx_ray.workflow import registry as default_registry
from genx_ray.writer import RunWriter

log = logging.getLogger("genx_ray.executor")
CANCEL_POLL_SECONDS = 0.2
HOST_ID = f"{socket.gethostname()}:{os.getpid()}"


async def execute_run(
    client: redis.asyncio.Redis,
    run_id: str,
    *,
    registry: Registry | None = None,
    settings: Settings | None = None,
    worker: str | None = None,
    lease_redis_url: str | None = None,
    attempt: int | None = None,
) -> RunStatus | None:
    """Run ``run_id`` (status ``queued``) to its end. Returns the final status, or None when the
    attempt lost its claim (another attempt took the run over: this one wrote nothing more).

    With ``lease_redis_url`` the attempt holds a heartbeat lease (see :mod:`genx_ray.lease`), so
    a supervisor restarts the run if this process dies. ``attempt``: run only that attempt (a
    stale delivery for another one raises :class:`InvalidTransition`).
    """
    settings = settings or Settings.from_env()
    runs = RunStore(
        client, maxlen=settings.stream_maxlen, retention_seconds=settings.retention_seconds
    )
    events = EventStore(client, maxlen=settings.stream_maxlen)
    run = await runs.get(run_id)
    if attempt is not None and run.attempt != attempt:
        raise InvalidTransition(run_id, f"{run.status.value} (attempt {run.attempt})", "running")
    attempt = run.attempt
    if lease_redis_url:
        await client.zadd(keys.LEASES, {run_id: time.time()})  # watched before it is claimed
    await runs.transition(
        run_id,
        RunStatus.RUNNING,
        allowed={RunStatus.QUEUED},
        event=RunStarted(run_id=run_id, workflow=run.workflow, attempt=attempt, worker=worker),
        # Where the attempt runs, for operators (and chaos tests) to find the host process.
        fields={
            "started_at": repr(time.time()),
            "worker": worker or "",
            "host": HOST_ID,
            "version": settings.deployment,  # the deployment that runs (and resumes) it
        },
        fence_attempt=attempt,
    )
    writer = RunWriter(events, run_id, attempt)
    lost = asyncio.Event()
    lease = None
    if lease_redis_url:
        loop = asyncio.get_running_loop()
        lease = Lease(
            lease_redis_url, run_id, attempt, settings.lease_seconds,
            on_lost=lambda: loop.call_soon_threadsafe(lost.set),
        )  # fmt: skip
        await asyncio.to_thread(lease.start)
    try:
        status = await _finish(
            runs, writer, lost, run, attempt, registry or default_registry, client
        )
        if status is not None:
            await notify(client, settings, run_id)
        return status
    finally:
        # Released only once the run has its terminal status (or was handed on): a crash before
        # that leaves the lease to expire, and the supervisor restarts the run.
        if lease is not None:
            await asyncio.to_thread(lease.release)


async def _finish(
    runs: RunStore,
    writer: RunWriter,
    lost: asyncio.Event,
    run: Run,
    attempt: int,
    registry: Registry,
    client: redis.asyncio.Redis,
) -> RunStatus | None:
    try:
        outcome = await _run_body(
            client, runs, writer, lost, run.id, run.workflow, run.input, attempt, registry
        )
    finally:
        await writer.close()
    if outcome is None or writer.fenced:
        return None
    status, fields, final_event = outcome
    fields["finished_at"] = repr(time.time())
    try:
        await runs.transition(
            run.id, status, allowed={RunStatus.RUNNING}, event=final_event, fields=fields,
            fence_attempt=attempt,
        )  # fmt: skip
    except Fenced:
        return None
    return status


async def _run_body(
    client: redis.asyncio.Redis,
    runs: RunStore,
    writer: RunWriter,
    lost: asyncio.Event,
    run_id: str,
    workflow_name: str,
    raw_input: Any,
    attempt: int,
    registry: Registry,
) -> tuple[RunStatus, dict[str, Any], Any] | None:
    """The run's outcome: status, fields and terminal event; None when this attempt lost its
    lease or was fenced (another attempt owns the run: write nothing more)."""
    raw_journal = await client.hgetall(keys.journal(run_id))
    journal = {str(k): JournalEntry.loads(str(v)) for k, v in raw_journal.items()}
    ctx = RunContext(run_id, workflow_name, attempt, client, writer, journal)
    try:
        wf = registry.get(workflow_name)
        inp = wf.parse_input(raw_input)
    except GenxError as exc:
        return _failed(run_id, exc)

    async def body() -> Any:
        with run_scope(ctx):
            return await wf.invoke(inp)

    task = asyncio.create_task(body(), name=f"genx-run-{run_id}")
    watcher = asyncio.create_task(_watch(runs, run_id, ctx, task, lost))
    try:
        output = wf.output.encode(await task)
        if ctx.cancel_requested:  # finished in the same instant it was cancelled: honour cancel
            raise RunCancelled(run_id)
        await writer.flush()
        fields = {"output": dumps(output)}
        return RunStatus.SUCCEEDED, fields, RunSucceeded(run_id=run_id, output=output)
    except (asyncio.CancelledError, RunCancelled):
        if lost.is_set():
            return None
        if not ctx.cancel_requested:
            raise  # the host itself is being torn down: not the user's cancel
        return (
            RunStatus.CANCELLED,
            {},
            RunCancelledEvent(run_id=run_id, reason="cancel requested"),
        )
    except Fenced:
        return None
    except Exception as exc:
        if ctx.cancel_requested:
            return (
                RunStatus.CANCELLED,
                {},
                RunCancelledEvent(run_id=run_id, reason="cancel requested"),
            )
        return _failed(run_id, exc)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _failed(run_id: str, exc: BaseException) -> tuple[RunStatus, dict[str, Any], Any]:
    error = ErrorInfo.from_exception(exc)
    return (
        RunStatus.FAILED,
        {"error": error.model_dump_json()},
        RunFailed(run_id=run_id, error=error),
    )


async def _watch(
    runs: RunStore, run_id: str, ctx: RunContext, task: asyncio.Task[Any], lost: asyncio.Event
) -> None:
    """Poll the cancel flag; on cancel, mark the context (steps stop at their next boundary) and
    cancel the body, which stops in-flight steps sooner (Ray tasks included). A lost lease stops
    the body at once."""
    while not task.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lost.wait(), CANCEL_POLL_SECONDS)
        if lost.is_set():
            task.cancel()
            return
        with contextlib.suppress(Exception):  # a Redis blip must not kill the run
            if await runs.cancel_requested(run_id):
                ctx.cancel_requested = True
                task.cancel()
                return
