"""Noticing when something holds a process's event loop: every run of the process waits then.

A thread watches a tick the loop sets every 0.1 s; when the tick is late by over a second, it logs
the step (and run) on the loop thread's stack, and says so again if it goes on twice as long.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time

log = logging.getLogger("genx_ray.runtime")
BLOCKED_SECONDS = 1.0  # a loop held this long is logged, with the step holding it
_TICK = 0.1


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
            if code.co_name == "_invoke" and code.co_filename.endswith("_steps.py"):
                spec, ctx = frame.f_locals.get("spec"), frame.f_locals.get("ctx")
                run = f" of run {ctx.run_id}" if ctx is not None else ""
                return f"step {getattr(spec, 'name', '?')}{run} ({where})"
            if code.co_name == "body" and code.co_filename.endswith("_attempt.py"):
                ctx = frame.f_locals.get("ctx")
                return f"the workflow body of run {getattr(ctx, 'run_id', '?')} ({where})"
            frame = frame.f_back
        return f"code outside any step ({where or 'unknown'})"
