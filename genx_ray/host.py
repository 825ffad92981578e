"""Run hosts: each running run executes in its own detached Ray actor.

Detached, so the worker that launched it can die (or be redeployed) without taking the run with
it: Ray kills what a dead owner owned, but not detached actors. The host holds the run's lease;
when it finishes, the worker kills it, and if the worker is gone it exits by itself shortly after.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from genx_ray.connections import async_redis
from genx_ray.errors import InvalidTransition, RunNotFound
from genx_ray.executor import execute_run
from genx_ray.settings import Settings

# After its run ends, a host whose worker did not kill it (the worker died) exits by itself.
ORPHAN_EXIT_SECONDS = 30.0
_host_class: Any = None


class _RunHost:
    def __init__(self, redis_url: str) -> None:
        from genx_ray.workflow import registry

        self.settings = Settings.from_env()
        self.registry = registry.load(self.settings.workflows)
        self.redis_url = redis_url

    def pid(self) -> int:
        return os.getpid()

    async def execute(self, run_id: str, attempt: int | None, worker: str) -> str | None:
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


async def run_on_host(redis_url: str, run_id: str, worker: str) -> str | None:
    """Execute the run in a new detached host and wait for it; the host is killed afterwards,
    and on cancellation (a drain) too."""
    import ray

    host = (
        host_class()
        .options(name=f"genx-host-{run_id}-{os.urandom(4).hex()}", lifetime="detached")
        .remote(redis_url)
    )
    try:
        result: str | None = await host.execute.remote(run_id, None, worker)
        return result
    finally:
        ray.kill(host)
