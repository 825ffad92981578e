"""Run hosts: each running run executes in its own detached Ray actor.

Detached, so the worker that launched it can die (or be redeployed) without taking the run with
it: Ray kills what a dead owner owned, but not detached actors. The host holds the run's lease.

Starting an actor costs seconds of CPU (a process, imports), so each worker keeps a few hosts
started ahead (:class:`WarmHosts`), and a host whose run ended goes back there for the next
run (one run at a time, up to ``GENX_HOST_MAX_RUNS``): back-to-back runs start no process.
A host nobody takes exits by itself after ``IDLE_EXIT_SECONDS``, and one whose worker died during
its run (nobody took it back) after ``ORPHAN_EXIT_SECONDS``, so a dead worker leaks none for long.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from genx_ray.connections import async_redis
from genx_ray.errors import InvalidTransition, RunNotFound
from genx_ray.executor import execute_run
from genx_ray.settings import Settings

# After its run ends, a host its worker did not take back (the worker died) exits by itself.
ORPHAN_EXIT_SECONDS = 30.0
# A host that no run takes within this long exits by itself.
IDLE_EXIT_SECONDS = 600.0
# How long after a run takes a host the worker starts replacements, if it still needs them.
REFILL_DELAY_SECONDS = 1.0
_host_class: Any = None


class _RunHost:
    def __init__(self, redis_url: str, idle_exit: float = IDLE_EXIT_SECONDS) -> None:
        from genx_ray.workflow import registry

        self.settings = Settings.from_env()
        self.registry = registry.load(self.settings.workflows)
        self.redis_url = redis_url
        self.runs = 0
        self._running = False
        self._exit_at = time.monotonic() + idle_exit
        threading.Thread(target=self._exit_when_unwanted, daemon=True).start()

    def _exit_when_unwanted(self) -> None:
        """Exit once idle past the deadline (a thread: it needs no event loop to notice)."""
        while True:
            time.sleep(min(1.0, max(0.05, self._exit_at - time.monotonic())))
            if not self._running and time.monotonic() >= self._exit_at:
                os._exit(0)

    def pid(self) -> int:
        return os.getpid()

    async def execute(self, run_id: str, attempt: int | None, worker: str) -> str | None:
        self._running, self.runs = True, self.runs + 1
        client = async_redis(self.redis_url)
        try:
            status = await execute_run(
                client, run_id, registry=self.registry, settings=self.settings,
                worker=worker, lease_redis_url=self.redis_url, attempt=attempt,
            )  # fmt: skip
            return status.value if status else None
        except (InvalidTransition, RunNotFound):
            return "skipped"  # another worker has it, or it was cancelled while queued
        finally:
            await client.aclose()
            self._exit_at = time.monotonic() + ORPHAN_EXIT_SECONDS
            self._running = False

    def keep(self) -> bool:
        """Taken back by its worker for another run: whether it has runs left to give."""
        if self.runs >= self.settings.host_max_runs:
            return False
        self._exit_at = time.monotonic() + IDLE_EXIT_SECONDS
        return True


def host_class() -> Any:
    """The Ray actor class (defined on first use: importing this module never imports Ray)."""
    global _host_class
    if _host_class is None:
        import ray

        remote: Any = ray.remote
        _host_class = remote(num_cpus=0, max_restarts=0, max_concurrency=8)(_RunHost)
    return _host_class


def start_host(redis_url: str) -> Any:
    """A new detached host (its process starts in the background)."""
    resources = dict(Settings.from_env().host_resources)
    return (
        host_class()
        .options(
            name=f"genx-host-{os.urandom(8).hex()}",
            lifetime="detached",
            resources=resources or None,
        )
        .remote(redis_url)
    )


class WarmHosts:
    """Hosts started ahead of the runs that will take them, and taken back after a run.

    ``size`` are started ahead. A run takes the newest ready one (or starts one if none is
    ready); a moment later the pool tops itself up to one ready host at least, and to ``size``
    counting the hosts out on runs, which come back when their run ends: back-to-back runs reuse
    the same processes, a burst starts new ones and reuses them while it lasts, and at most
    ``size`` idle ones are kept once it is over.
    """

    def __init__(self, redis_url: str, size: int) -> None:
        self.redis_url, self.size = redis_url, max(1, size)
        now = time.monotonic()
        self._ready: list[tuple[Any, float]] = [  # (host, ready since), the newest last
            (start_host(redis_url), now) for _ in range(self.size)
        ]
        self._out = 0
        self._closed = False

    def take(self) -> Any:
        import ray

        now = time.monotonic()
        # Too close to exiting by itself for idleness: not worth the race.
        while self._ready and now - self._ready[0][1] > IDLE_EXIT_SECONDS - 30:
            ray.kill(self._ready.pop(0)[0])
        host = self._ready.pop()[0] if self._ready else start_host(self.redis_url)
        self._out += 1
        # Refill a moment later: a host whose run just ended is usually on its way back.
        asyncio.get_running_loop().call_later(REFILL_DELAY_SECONDS, self._refill)
        return host

    def _refill(self) -> None:
        while not self._closed and (not self._ready or len(self._ready) + self._out < self.size):
            self._ready.insert(0, (start_host(self.redis_url), time.monotonic()))

    def give(self, host: Any, reusable: bool) -> None:
        """A host back from its run: kept if reusable and the pool is not above ``size`` plus
        the hosts still out (a burst keeps its hosts while it lasts, then the pool shrinks)."""
        import ray

        self._out -= 1
        if reusable and not self._closed:
            self._ready.append((host, time.monotonic()))
        else:
            ray.kill(host)
        while len(self._ready) > self.size + self._out:
            ray.kill(self._ready.pop(0)[0])  # the one idle longest

    async def run(self, run_id: str, worker: str) -> str | None:
        """Execute the run on a host and wait for it. The host comes back for another run if
        the run ended (whatever its status) and the host has runs left; it is killed if it
        died, or on cancellation (a drain)."""
        host = self.take()
        reusable = False
        try:
            result: str | None = await host.execute.remote(run_id, None, worker)
            reusable = bool(await host.keep.remote())
            return result
        finally:
            self.give(host, reusable)

    def close(self) -> None:
        import ray

        self._closed = True
        for host, _ in self._ready:
            ray.kill(host)
        self._ready.clear()
