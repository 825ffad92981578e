"""Run hosts: each running run executes in its own detached Ray actor.

Detached, so the worker that launched it can die (or be redeployed) without taking the run with
it: Ray kills what a dead owner owned, but not detached actors. The host holds the run's lease;
when it finishes, the worker kills it, and if the worker is gone it exits by itself shortly after.

Starting an actor costs seconds (a process, imports), so each worker keeps a few hosts started
ahead (:class:`WarmHosts`): a run takes a ready one and a replacement starts in the background.
A warm host nobody takes exits by itself after ``IDLE_EXIT_SECONDS``, so a worker that dies leaks
none for long.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from genx_ray.connections import async_redis
from genx_ray.errors import InvalidTransition, RunNotFound
from genx_ray.executor import execute_run
from genx_ray.settings import Settings

# After its run ends, a host whose worker did not kill it (the worker died) exits by itself.
ORPHAN_EXIT_SECONDS = 30.0
# A started host that no run takes within this long exits by itself.
IDLE_EXIT_SECONDS = 600.0
_host_class: Any = None


class _RunHost:
    def __init__(self, redis_url: str, idle_exit: float = IDLE_EXIT_SECONDS) -> None:
        from genx_ray.workflow import registry

        self.settings = Settings.from_env()
        self.registry = registry.load(self.settings.workflows)
        self.redis_url = redis_url
        self._taken = threading.Event()
        threading.Thread(target=self._exit_if_idle, args=(idle_exit,), daemon=True).start()

    def _exit_if_idle(self, idle_exit: float) -> None:
        if not self._taken.wait(idle_exit):
            os._exit(0)

    def pid(self) -> int:
        return os.getpid()

    async def execute(self, run_id: str, attempt: int | None, worker: str) -> str | None:
        self._taken.set()
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
            asyncio.get_running_loop().call_later(ORPHAN_EXIT_SECONDS, os._exit, 0)


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
    """Hosts started ahead of the runs that will take them."""

    def __init__(self, redis_url: str, size: int) -> None:
        self.redis_url, self.size = redis_url, size
        self._ready: list[Any] = [start_host(redis_url) for _ in range(size)]

    def take(self) -> Any:
        host = self._ready.pop(0) if self._ready else start_host(self.redis_url)
        while len(self._ready) < self.size:
            self._ready.append(start_host(self.redis_url))
        return host

    def close(self) -> None:
        import ray

        for host in self._ready:
            ray.kill(host)
        self._ready.clear()


async def run_on_host(host: Any, run_id: str, worker: str) -> str | None:
    """Execute the run in ``host`` and wait for it; the host is killed afterwards, and on
    cancellation (a drain) too."""
    import ray

    try:
        result: str | None = await host.execute.remote(run_id, None, worker)
        return result
    finally:
        ray.kill(host)
