"""A process that executes runs: many at once, each an asyncio task, sharing what is costly.

A run host (a Ray actor), an inline worker and ``genx_ray.start`` in a script each have one
:class:`Runtime`. Per process, not per run: one Redis connection pool, one batch writer (every
run's events and journal entries in one pipeline, :mod:`genx_ray.writer`), one lease renewer
thread (every run's lease in one round trip, :mod:`genx_ray.lease`), one listener on the signals
stream (a cancel reaches its run within a second, whichever of thousands it is), and one
watchdog thread that names the step when something blocks the event loop: one run must not stall
the others, so a step that holds the loop for more than a second is logged with its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from typing import Any, cast

from genx_ray import keys, tracing
from genx_ray.connections import is_cluster, on_node_of
from genx_ray.executor import Attempt, execute, start, start_many
from genx_ray.lease import Leases
from genx_ray.outage import OutageLog
from genx_ray.runs import RunStore
from genx_ray.settings import Settings
from genx_ray.workflow import Registry
from genx_ray.writer import BatchWriter

log = logging.getLogger("genx_ray.runtime")
BLOCKED_SECONDS = 1.0  # a loop held this long is logged, with the step holding it
_TICK = 0.1


class Runtime:
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
        tracing.setup("script")  # unless the process did already (a worker, a run host)
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
        return [(a.run_id, a.attempt) for a in self.active.values() if a.attempt is not None]

    async def start(
        self, run_id: str, worker: str, *, attempt: int | None = None, workflow: str | None = None
    ) -> bool:
        """Claim the run and go on executing it in the background; False if it was not this
        attempt's to run. See :func:`genx_ray.executor.start`."""
        return await start(self, run_id, worker, attempt=attempt, workflow=workflow) is not None

    async def start_many(
        self, runs: list[tuple[str, int | None, str | None]], worker: str
    ) -> list[bool]:
        """:meth:`start` for many (run id, attempt, workflow), their claims in one pipeline."""
        return [me is not None for me in await start_many(self, runs, worker)]

    async def execute(
        self, run_id: str, worker: str, *, attempt: int | None = None, workflow: str | None = None
    ) -> str | None:
        """Execute the run to its end: see :func:`genx_ray.executor.execute`."""
        return await execute(self, run_id, worker, attempt=attempt, workflow=workflow)

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


class Watchdog:
    """Notices when something holds the event loop: a thread watches a tick the loop sets, and
    names the step (and run) on the loop's stack when the tick is late by over a second."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.last_tick = time.monotonic()
        self._stop = threading.Event()
        self._loop_thread = threading.get_ident()
        self._handle = loop.call_soon(self._tick)
        threading.Thread(target=self._watch, name="genx-watchdog", daemon=True).start()

    def _tick(self) -> None:
        self.last_tick = time.monotonic()
        if not self._stop.is_set():
            self._handle = self.loop.call_later(_TICK, self._tick)

    def stop(self) -> None:
        self._stop.set()
        self._handle.cancel()

    def _watch(self) -> None:
        reported = 0.0
        while not self._stop.wait(0.25):
            late = time.monotonic() - self.last_tick
            if late < BLOCKED_SECONDS:
                reported = 0.0
                continue
            if reported and late < reported * 2:
                continue  # already said; say it again if it goes on twice as long
            reported = late
            log.warning(
                "the event loop has been blocked for %.1f s by %s: every run of this process "
                "waits meanwhile. Run CPU-heavy or blocking code as a sync `def` component (a "
                "thread) or place it with num_cpus= (a Ray task).",
                late, self.blocker(),
            )  # fmt: skip

    def blocker(self) -> str:
        """The step (or workflow body) on the loop thread's stack right now, as text."""
        frame = sys._current_frames().get(self._loop_thread)
        where = None
        while frame is not None:
            code = frame.f_code
            if where is None and "genx_ray" not in code.co_filename:
                where = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
            if code.co_name == "_invoke" and code.co_filename.endswith("steps.py"):
                spec, ctx = frame.f_locals.get("spec"), frame.f_locals.get("ctx")
                run = f" of run {ctx.run_id}" if ctx is not None else ""
                return f"step {getattr(spec, 'name', '?')}{run} ({where})"
            if code.co_name == "body" and code.co_filename.endswith("executor.py"):
                ctx = frame.f_locals.get("ctx")
                return f"the workflow body of run {getattr(ctx, 'run_id', '?')} ({where})"
            frame = frame.f_back
        return f"code outside any step ({where or 'unknown'})"
