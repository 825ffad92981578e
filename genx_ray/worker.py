"""``genx worker``: takes runs from the Redis queue and executes them.

Each run executes in its own detached Ray actor (``hosts="ray"``, see :mod:`genx_ray.host`), or
on this process's event loop (``hosts="inline"``: no Ray process per run, for tests and small
setups). Either way the run holds a heartbeat lease, and every worker also runs a supervisor that
restarts runs whose host died. A cap on concurrent runs is the admission control. On SIGTERM the
worker stops taking runs, lets running ones finish within the drain timeout, then hands the rest
back to the queue as a new attempt: their journal keeps every completed step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time

import redis.asyncio

from genx_ray.connections import async_redis
from genx_ray.errors import InvalidTransition, RunNotFound
from genx_ray.events import RunRestarted
from genx_ray.executor import execute_run
from genx_ray.queue import RunQueue
from genx_ray.runs import RunStatus, RunStore
from genx_ray.settings import Settings
from genx_ray.supervisor import Supervisor
from genx_ray.workflow import Registry
from genx_ray.workflow import registry as default_registry

log = logging.getLogger("genx_ray.worker")


class Worker:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        registry: Registry | None = None,
        settings: Settings | None = None,
        max_runs: int = 32,
        drain_timeout: float = 30.0,
        name: str | None = None,
        hosts: str = "inline",
        redis_url: str | None = None,
    ) -> None:
        if hosts not in ("inline", "ray"):
            raise ValueError(f"hosts must be 'inline' or 'ray', not {hosts!r}")
        self.hosts = hosts
        if hosts == "ray" and not redis_url:
            raise ValueError("hosts='ray' needs the redis_url the run hosts connect to")
        # Without a URL (inline, embedded in tests) runs hold no lease and are not supervised.
        self.redis_url = redis_url
        self.redis = client
        self.registry = registry or default_registry
        self.settings = settings or Settings.from_env()
        self.max_runs = max_runs
        self.drain_timeout = drain_timeout
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.queue = RunQueue(client)
        self.runs = RunStore(
            client,
            maxlen=self.settings.stream_maxlen,
            retention_seconds=self.settings.retention_seconds,
        )
        self._active: dict[str, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(max_runs)
        self.supervisor = Supervisor(client, self.settings)

    def stop(self) -> None:
        """Stop taking runs; :meth:`serve` then drains and returns."""
        self._stopping.set()

    async def serve(self) -> None:
        await self.queue.ensure_group()
        log.info("worker %s: taking runs (at most %d at once)", self.name, self.max_runs)
        supervisor = asyncio.create_task(self.supervisor.serve(self._stopping))
        while not self._stopping.is_set():
            await self._slots.acquire()
            if self._stopping.is_set():
                self._slots.release()
                break
            try:
                taken = await self.queue.take(self.name, 1, block_ms=500)
            except (OSError, redis.RedisError) as exc:
                self._slots.release()
                log.warning("worker %s: queue read failed (%s); retrying", self.name, exc)
                await asyncio.sleep(1)
                continue
            if not taken:
                self._slots.release()
                continue
            entry_id, run_id = taken[0]
            task = asyncio.create_task(self._execute(entry_id, run_id), name=f"run-{run_id}")
            self._active[run_id] = task
        await self._drain()
        await supervisor

    async def _execute(self, entry_id: str, run_id: str) -> None:
        try:
            if self.hosts == "ray" and self.redis_url:
                from genx_ray.host import run_on_host

                await run_on_host(self.redis_url, run_id, self.name)
            else:
                await execute_run(
                    self.redis, run_id, registry=self.registry, settings=self.settings,
                    worker=self.name, lease_redis_url=self.redis_url,
                )  # fmt: skip
            await self.queue.ack(entry_id)
        except (InvalidTransition, RunNotFound):
            await self.queue.ack(entry_id)  # cancelled while queued, or expired: nothing to do
        except asyncio.CancelledError:
            await self._hand_back(entry_id, run_id)
            raise
        except Exception:
            log.exception("worker %s: run %s crashed its host", self.name, run_id)
        finally:
            self._active.pop(run_id, None)
            self._slots.release()

    async def _drain(self) -> None:
        if self._active:
            log.info("worker %s: draining %d run(s)", self.name, len(self._active))
            _, pending = await asyncio.wait(list(self._active.values()), timeout=self.drain_timeout)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _hand_back(self, entry_id: str, run_id: str) -> None:
        """Requeue a run this worker will not finish, as its next attempt."""
        with contextlib.suppress(RunNotFound, InvalidTransition):
            run = await self.runs.get(run_id)
            if run.status is RunStatus.RUNNING:
                attempt = run.attempt + 1
                await self.runs.transition(
                    run_id,
                    RunStatus.QUEUED,
                    allowed={RunStatus.RUNNING},
                    fields={"attempt": str(attempt), "requeued_at": repr(time.time())},
                    event=RunRestarted(
                        run_id=run_id, attempt=attempt, reason=f"worker {self.name} drained"
                    ),
                    fence_attempt=run.attempt,
                )
                await self.queue.put(run_id)
        await self.queue.ack(entry_id)


async def serve_worker(
    redis_url: str, *, max_runs: int = 32, drain_timeout: float = 30.0, hosts: str = "ray"
) -> None:
    """Run a worker until SIGTERM or SIGINT, then drain."""
    settings = Settings.from_env()
    registry = default_registry.load(settings.workflows)
    if hosts == "ray":
        from genx_ray.cluster import ensure_ray

        await asyncio.to_thread(ensure_ray, settings.ray_address, redis_url=redis_url)
    client = async_redis(redis_url)
    worker = Worker(
        client, registry=registry, settings=settings, max_runs=max_runs,
        drain_timeout=drain_timeout, hosts=hosts, redis_url=redis_url,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.serve()
    finally:
        await client.aclose()
