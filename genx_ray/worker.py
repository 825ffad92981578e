"""``genx worker``: takes runs from the Redis queue and executes them.

Each run executes on this process's event loop as its run host; steps placed on Ray run as Ray
tasks. A cap on concurrent runs is the admission control. On SIGTERM the worker stops taking runs,
lets running ones finish within the drain timeout, then hands the rest back to the queue as a new
attempt: their journal keeps every completed step, so they resume elsewhere without redoing any.
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
    ) -> None:
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

    def stop(self) -> None:
        """Stop taking runs; :meth:`serve` then drains and returns."""
        self._stopping.set()

    async def serve(self) -> None:
        await self.queue.ensure_group()
        log.info("worker %s: taking runs (at most %d at once)", self.name, self.max_runs)
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

    async def _execute(self, entry_id: str, run_id: str) -> None:
        try:
            await execute_run(
                self.redis, run_id, registry=self.registry, settings=self.settings, worker=self.name
            )
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


async def serve_worker(redis_url: str, *, max_runs: int = 32, drain_timeout: float = 30.0) -> None:
    """Run a worker until SIGTERM or SIGINT, then drain."""
    settings = Settings.from_env()
    registry = default_registry.load(settings.workflows)
    client = async_redis(redis_url)
    worker = Worker(
        client, registry=registry, settings=settings, max_runs=max_runs, drain_timeout=drain_timeout
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.serve()
    finally:
        await client.aclose()
