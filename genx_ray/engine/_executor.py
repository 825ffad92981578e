"""A process that executes runs: many at once, each an asyncio task, sharing what is costly.

A run host (a Ray actor), an inline worker and ``genx_ray.start`` in a script each have one
:class:`Executor`. Per process, not per run: one Redis connection pool, one batch writer (every
run's events and journal entries in one pipeline), one lease renewer thread (every run's lease
in one round trip), one listener on the signals stream (a cancel reaches its run within a
second, whichever of thousands it is), one watchdog thread that names the step when something
blocks the event loop, and one observer. Each run is an :class:`~._attempt.Attempt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, cast

from genx_ray.engine._attempt import PROCESS_ID, Attempt
from genx_ray.engine._watchdog import Watchdog
from genx_ray.flow import Registry, Workflow
from genx_ray.model import Fenced, InvalidTransition, RunNotFound, RunStartedEvent, Settings
from genx_ray.observe import OutageLog, setup
from genx_ray.store import (
    BatchWriter,
    Claim,
    Leases,
    RunStore,
    is_cluster,
    keys,
    on_node_of,
)

log = logging.getLogger("genx_ray.runtime")

# What a worker hands an executor to start: (run id, attempt, workflow); the two last may be
# None (read from the run then).
RunToStart = tuple[str, int | None, str | None]
SKIPPED = "skipped"  # what an attempt that was not to run (cancelled, taken, superseded) returns


class Executor:
    def __init__(
        self,
        client: Any,
        registry: Registry,
        settings: Settings,
        *,
        redis_url: str | None,
    ) -> None:
        """``redis_url``: where the lease renewer connects (None: runs hold no lease, so nothing
        restarts them if this process dies: for tests only)."""
        self.observer = setup("script")  # unless the process did already (a worker, a run host)
        self.redis = client
        self.registry = registry
        self.settings = settings
        self.runs = RunStore(
            client, maxlen=settings.stream_maxlen, retention_seconds=settings.retention_seconds
        )
        self.writes = BatchWriter(
            client, maxlen=settings.stream_maxlen, retention=settings.retention_seconds
        )
        self.active: dict[str, Attempt] = {}
        self.loop = asyncio.get_running_loop()
        self.leases = (
            Leases(
                redis_url, settings.lease_seconds,
                on_lost=lambda run_id, attempt: self._threadsafe(run_id, attempt, Attempt.lose),
                on_cancel=lambda run_id, attempt: self._threadsafe(
                    run_id, attempt, Attempt.cancel
                ),
            )
            if redis_url
            else None
        )  # fmt: skip
        # A cancelled blocking read can come back as an empty one (a cancel that meets the
        # read's own timeout is taken for that timeout): loops check this flag, not only cancel.
        self._closing = False
        self._signals = self.loop.create_task(self._listen(), name="genx-signals")
        self._watchdog = Watchdog(self.loop)

    @property
    def load(self) -> int:
        """Runs executing here now."""
        return len(self.active)

    def attempts(self) -> list[tuple[str, int]]:
        """(run id, attempt) of every run executing here."""
        return [(a.run_id, a.attempt) for a in self.active.values()]

    async def start(
        self, run_id: str, worker: str, *, attempt: int | None = None, workflow: str | None = None
    ) -> bool:
        """Claim the run and go on executing it in the background; False if it was not this
        attempt's to run (cancelled while queued, taken by another, superseded). Without
        ``attempt`` and ``workflow`` (which the queue entry usually carries), they are read from
        the run."""
        (started,) = await self.start_many([(run_id, attempt, workflow)], worker)
        return started

    async def start_many(self, runs: list[RunToStart], worker: str) -> list[bool]:
        """:meth:`start` for many runs: their claims in one pipeline."""
        return [me is not None for me in await self._start(runs, worker)]

    async def execute(
        self, run_id: str, worker: str, *, attempt: int | None = None, workflow: str | None = None
    ) -> str | None:
        """Start the run, then wait for the attempt's end: the final status, :data:`SKIPPED`, or
        None (lost)."""
        (me,) = await self._start([(run_id, attempt, workflow)], worker)
        if me is None or me.runner is None:
            return SKIPPED
        return await me.runner

    async def start_child_here(self, run_id: str, workflow: Workflow[Any, Any]) -> None:
        """A child of a run started from a script: it runs in the same process (workers may not
        have its code)."""
        self.registry.add(workflow)
        await self.start(run_id, "local", attempt=1, workflow=workflow.name)

    async def _start(self, runs: list[RunToStart], worker: str) -> list[Attempt | None]:
        known = [await self._known(*run) for run in runs]
        mine: list[tuple[Attempt, str]] = []
        for item in known:
            if item is not None and (me := await self._take(item[0], item[1])) is not None:
                mine.append((me, item[2]))
        leased = self.leases is not None
        claims = [
            Claim(me.run_id, me.attempt,
                  RunStartedEvent(run_id=me.run_id, workflow=wf, attempt=me.attempt, worker=worker),
                  {"started_at": repr(time.time()), "worker": worker, "host": PROCESS_ID,
                   # the deployment that runs (and resumes) it
                   "version": self.settings.deployment})
            for me, wf in mine
        ]  # fmt: skip
        results = await self.runs.claim_many(
            claims, self.settings.lease_seconds if leased else None, watch=leased
        )
        started: dict[str, Attempt] = {}
        for (me, _), result in zip(mine, results, strict=True):
            if isinstance(result, InvalidTransition | RunNotFound | Fenced):
                self.forget(me)
                continue
            if isinstance(result, Exception):
                self.forget(me)
                raise result
            if self.leases is not None:
                self.leases.hold(me.run_id, me.attempt)
            me.begin(*result)
            started[me.run_id] = me
        return [started.get(run[0]) for run in runs]

    async def _known(
        self, run_id: str, attempt: int | None, workflow: str | None
    ) -> tuple[str, int, str] | None:
        """The run's attempt and workflow, read from the run if the caller did not say."""
        if attempt is not None and workflow is not None:
            return run_id, attempt, workflow
        raw_attempt, raw_workflow = await self.redis.hmget(keys.run(run_id), "attempt", "workflow")
        if raw_attempt is None:
            return None
        return run_id, int(raw_attempt), str(raw_workflow)

    async def _take(self, run_id: str, attempt: int) -> Attempt | None:
        """Register the attempt in this process; None if this process runs it already. A newer
        attempt of a run an older one still runs here (this process was frozen) supersedes it."""
        me = Attempt(self, run_id, attempt)
        while (other := self.active.setdefault(run_id, me)) is not me:
            if other.attempt >= attempt:
                return None  # a duplicate delivery
            other.lose()
            await other.done.wait()
        return me

    def forget(self, me: Attempt) -> None:
        """``me`` ended (or never started): it holds no place here any more."""
        me.done.set()
        if self.active.get(me.run_id) is me:
            del self.active[me.run_id]

    def cancel(self, run_id: str) -> bool:
        """Stop a run on request (its status becomes ``cancelled``); False if not here."""
        active = self.active.get(run_id)
        if active is not None:
            active.cancel()
        return active is not None

    def abandon(self, run_id: str) -> bool:
        """Stop a run handed on to another attempt (a drain): it writes nothing more."""
        active = self.active.get(run_id)
        if active is not None:
            active.lose()
        return active is not None

    async def close(self) -> None:
        """Stop every run still here (they stay ``running``: their leases expire and the
        supervisor restarts them elsewhere), then the shared services."""
        for active in list(self.active.values()):
            if active.task is not None:
                active.task.cancel()
            elif active.runner is not None:
                active.runner.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*(a.done.wait() for a in list(self.active.values()))), 5
            )
        self._closing = True
        self._signals.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._signals
        self._watchdog.stop()
        await self.writes.close()
        if self.leases is not None:
            await asyncio.to_thread(self.leases.close)

    def _threadsafe(self, run_id: str, attempt: int, action: Any) -> None:
        def act() -> None:
            active = self.active.get(run_id)
            if active is not None and active.attempt == attempt:
                action(active)

        self.loop.call_soon_threadsafe(act)

    async def _listen(self) -> None:
        """Follow the signals stream from its tail: cancels for runs of this process."""
        last = "$"
        outage = OutageLog("signals", log)
        while not self._closing:
            try:
                if is_cluster(self.redis):
                    raw = await on_node_of(
                        self.redis, keys.SIGNALS, "XREAD", "COUNT", 500, "BLOCK", 1000,
                        "STREAMS", keys.SIGNALS, last,
                    )  # fmt: skip
                else:
                    raw = await self.redis.xread({keys.SIGNALS: last}, count=500, block=1000)
                resp = cast(list[Any], raw)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outage.failed(exc)
                await asyncio.sleep(1)
                continue
            outage.ok()
            for _, entries in resp or ():
                for entry_id, fields in entries:
                    last = entry_id
                    if fields.get("signal") == "cancel":
                        self.cancel(fields.get("run", ""))
