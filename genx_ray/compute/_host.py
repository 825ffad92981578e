"""Run hosts: detached async Ray actors, each executing many runs at once.

Each run on a host is an asyncio task with its own context; the host shares its Redis pool,
batch writer, lease renewer and signal listener between them (:class:`genx_ray.engine._executor.Executor`),
so a waiting run costs a task and its state, not a process. ``GENX_HOST_RUNS`` caps the runs
one host executes at once (1: a process per run, for code that must be isolated).

Detached, so the worker that placed a run can die (or be redeployed) without taking the run
along: Ray kills what a dead owner owned, but not detached actors. A host exits by itself once
it has run nothing and heard nothing from its worker for ``ORPHAN_EXIT_SECONDS``, so a dead
worker leaks none for long. The worker side is :mod:`genx_ray.compute._hosts`.

Observability: its answer to the worker's ping carries its metrics (what it recorded, when that
moved), which the worker's ``/metrics`` shows; an idle host flushes its spans at each ping, as
the worker kills a host it retires (see :mod:`genx_ray.observe`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from genx_ray.engine import Executor
from genx_ray.observe import flush, setup, snapshot, tracing_enabled

# A host with no run that no worker pinged for this long exits by itself.
ORPHAN_EXIT_SECONDS = 30.0
_host_class: Any = None


class RunHost:
    def __init__(self, redis_url: str) -> None:
        setup("run-host")
        self.redis_url = redis_url
        self.accepted = 0  # runs taken over its lifetime
        self._runtime: Executor | None = None
        self._heard = time.monotonic()
        threading.Thread(target=self._exit_when_orphaned, daemon=True).start()

    async def _rt(self) -> Executor:
        if self._runtime is None:
            from genx_ray.flow import registry
            from genx_ray.model import Settings
            from genx_ray.store import async_redis

            settings = Settings.current()
            self._runtime = Executor(
                async_redis(self.redis_url), registry.load(settings.workflows), settings,
                redis_url=self.redis_url,
            )  # fmt: skip
        return self._runtime

    def _exit_when_orphaned(self) -> None:
        """A thread: it notices even when the loop is stuck."""
        while True:
            time.sleep(1.0)
            idle = self._runtime is None or not self._runtime.active
            if idle and time.monotonic() - self._heard > ORPHAN_EXIT_SECONDS:
                flush()
                os._exit(0)

    async def ping(self, metrics_mark: int | None = None) -> dict[str, Any]:
        """Alive, and what it runs: what the worker's health check reads. With its metrics,
        unless nothing was recorded since ``metrics_mark`` (the mark of the last it got)."""
        self._heard = time.monotonic()
        rt = await self._rt()
        if not rt.active and tracing_enabled():
            await asyncio.to_thread(flush)  # idle: the worker may retire (kill) it
        mark, recorded = snapshot(if_changed_since=metrics_mark)
        return {"pid": os.getpid(), "runs": rt.attempts(), "accepted": self.accepted,
                "metrics_mark": mark, "metrics": recorded}  # fmt: skip

    async def start(
        self, runs: list[tuple[str, int | None, str | None]], worker: str
    ) -> list[bool]:
        """Claim each (run id, attempt, workflow) and go on executing the claimed ones; whether
        each was claimed (False: not this attempt's to run)."""
        self._heard = time.monotonic()
        self.accepted += len(runs)
        rt = await self._rt()
        return await rt.start_many(runs, worker)

    async def abandon(self, run_ids: list[str]) -> int:
        """Stop runs handed on to their next attempt (a draining worker requeued them)."""
        rt = await self._rt()
        return sum(rt.abandon(run_id) for run_id in run_ids)


def host_class() -> Any:
    """The Ray actor class (defined on first use: importing this module never imports Ray)."""
    global _host_class
    if _host_class is None:
        import ray

        remote: Any = ray.remote
        # Calls are short (a run goes on after its start call returns): pings, starts, hand-backs.
        _host_class = remote(num_cpus=0, max_restarts=0, max_concurrency=1000)(RunHost)
    return _host_class


def start_host(redis_url: str, resources: dict[str, float] | None = None) -> Any:
    """A new detached host, spread over the nodes that offer ``resources`` (its process starts in
    the background: :meth:`RunHost.ping` answers once it is up)."""
    return (
        host_class()
        .options(
            name=f"genx-host-{os.urandom(8).hex()}",
            lifetime="detached",
            resources=resources or None,
            scheduling_strategy="SPREAD",
        )
        .remote(redis_url)
    )


BOOT_SECONDS = 120.0  # a host not up by then is given up on


async def wait_ready(actor: Any) -> dict[str, Any]:
    info: dict[str, Any] = await asyncio.wait_for(actor.ping.remote(), BOOT_SECONDS)
    return info
