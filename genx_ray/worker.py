"""``genx worker``: takes runs from the Redis queue and executes them.

Each run executes in its own detached Ray actor (``hosts="ray"``, see :mod:`genx_ray.host`), or
on this process's event loop (``hosts="inline"``: no Ray process per run, for tests and small
setups). Either way the run holds a heartbeat lease, and every worker also runs a supervisor that
restarts runs whose host died, and delivers webhooks.

Admission: at most ``max_runs`` runs per worker, and ``GENX_MAX_RUNNING`` across every worker on
the same Redis: a run is admitted by one script that counts the watched runs and registers it.

Drain: on SIGTERM the worker stops taking runs, lets running ones finish within the drain timeout,
then hands the rest back to the queue as a new attempt: their journal keeps every completed step.

Deployments (blue/green): a run is stamped at each claim with the ``GENX_DEPLOYMENT`` of the
worker that runs it. A worker that takes a run stamped with another deployment leaves it to that
deployment while one of its workers is alive and not draining; otherwise it adopts the run. So a
deploy is: start the new workers, SIGTERM the old ones (with a drain timeout long enough for their
runs): new runs go to whichever takes them, old runs finish on old workers, and what the old
workers hand back is adopted by the new deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from typing import TYPE_CHECKING

import redis.asyncio

from genx_ray import keys
from genx_ray.connections import async_redis
from genx_ray.errors import InvalidTransition, RunNotFound
from genx_ray.events import RunRestarted
from genx_ray.executor import execute_run
from genx_ray.queue import RunQueue
from genx_ray.runs import RunStatus, RunStore
from genx_ray.settings import Settings
from genx_ray.supervisor import Supervisor
from genx_ray.webhooks import WebhookSender

if TYPE_CHECKING:
    from genx_ray.host import WarmHosts
from genx_ray.workflow import Registry
from genx_ray.workflow import registry as default_registry

log = logging.getLogger("genx_ray.worker")

# KEYS: the watched-runs set. ARGV: cap, run id, now, oldest renewal of a live lease. Admit (and
# watch) the run if the live leases are under the cap.
_ADMIT = """
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 1 end
if redis.call('ZCOUNT', KEYS[1], ARGV[4], '+inf') >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
return 1
"""
WORKER_HEARTBEAT_SECONDS = 2.0


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
        warm_hosts: int = 2,
    ) -> None:
        if hosts not in ("inline", "ray"):
            raise ValueError(f"hosts must be 'inline' or 'ray', not {hosts!r}")
        self.hosts = hosts
        if hosts == "ray" and not redis_url:
            raise ValueError("hosts='ray' needs the redis_url the run hosts connect to")
        # Without a URL (inline, embedded in tests) runs hold no lease and are not supervised.
        self.redis_url = redis_url
        self.warm_hosts = warm_hosts
        self._warm: WarmHosts | None = None
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
        self.webhooks = WebhookSender(client, self.settings, self.name)
        self._admit_script = client.register_script(_ADMIT)

    def stop(self) -> None:
        """Stop taking runs; :meth:`serve` then drains and returns."""
        self._stopping.set()

    async def serve(self) -> None:
        await self.queue.ensure_group()
        if self.hosts == "ray" and self.redis_url:
            from genx_ray.host import WarmHosts

            self._warm = WarmHosts(self.redis_url, self.warm_hosts)
        log.info("worker %s: taking runs (at most %d at once)", self.name, self.max_runs)
        background = [
            asyncio.create_task(self.supervisor.serve(self._stopping)),
            asyncio.create_task(self.webhooks.serve(self._stopping)),
            asyncio.create_task(self._announce()),
        ]
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
            if self._stopping.is_set():  # stopped while waiting on the queue: not ours to run
                await self.queue.put(run_id)
                await self.queue.ack(entry_id)
                self._slots.release()
                break
            task = asyncio.create_task(self._execute(entry_id, run_id), name=f"run-{run_id}")
            self._active[run_id] = task
        await self._drain()
        if self._warm is not None:
            self._warm.close()
        await asyncio.gather(*background)

    async def _admit(self, run_id: str) -> bool:
        """Wait for a cluster-wide slot (``GENX_MAX_RUNNING``); False if stopping first."""
        cap = self.settings.max_running
        while cap:
            now = time.time()
            # A stale lease (a dead host the supervisor has not requeued yet) holds no slot.
            live = now - self.settings.lease_seconds
            if await self._admit_script(keys=[keys.LEASES], args=[cap, run_id, now, live]):
                return True
            if self._stopping.is_set():
                return False
            await asyncio.sleep(0.2)  # polled: slots free up in other processes
        return True

    async def _announce(self) -> None:
        """Keep this worker's entry in the worker table fresh; mark it draining on stop."""
        try:
            while True:
                entry = {"version": self.settings.deployment, "draining": self._stopping.is_set(),
                         "seen": time.time(), "hosts": self.hosts}  # fmt: skip
                with contextlib.suppress(OSError, redis.RedisError):
                    await self.redis.hset(keys.WORKERS, self.name, json.dumps(entry))
                if self._stopping.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), WORKER_HEARTBEAT_SECONDS)
        finally:
            if self._stopping.is_set() and not self._active:
                with contextlib.suppress(OSError, redis.RedisError):
                    await self.redis.hdel(keys.WORKERS, self.name)

    async def _deployment_alive(self, version: str) -> bool:
        table = await self.redis.hgetall(keys.WORKERS)
        now = time.time()
        for raw in table.values():
            w = json.loads(raw)
            if (w["version"] == version and not w["draining"]
                    and now - w["seen"] < 3 * WORKER_HEARTBEAT_SECONDS):  # fmt: skip
                return True
        return False

    async def _belongs_elsewhere(self, run_id: str) -> bool:
        version = await self.redis.hget(keys.run(run_id), "version")
        return (
            version is not None
            and version != self.settings.deployment
            and await self._deployment_alive(str(version))
        )

    async def _execute(self, entry_id: str, run_id: str) -> None:
        try:
            if await self._belongs_elsewhere(run_id) or not await self._admit(run_id):
                await asyncio.sleep(0.2)  # leave it to its own deployment's workers, or for later
                await self.queue.put(run_id)
                await self.queue.ack(entry_id)
                return
            if self._warm is not None:
                await self._warm.run(run_id, self.name)
            else:
                await execute_run(
                    self.redis, run_id, registry=self.registry, settings=self.settings,
                    worker=self.name, lease_redis_url=self.redis_url,
                )  # fmt: skip
            await self.queue.ack(entry_id)
        except (InvalidTransition, RunNotFound):
            await self.queue.ack(entry_id)  # cancelled while queued, or expired: nothing to do
            if await self.redis.hget(keys.run(run_id), "status") != "running":
                await self.redis.zrem(keys.LEASES, run_id)  # free its admission slot
        except asyncio.CancelledError:
            await self._hand_back(entry_id, run_id)
            raise
        except Exception as exc:
            # The host died (node lost, OOM...). A claimed run is the supervisor's to restart
            # once its lease expires; one never claimed goes back on the queue.
            log.warning("worker %s: the host of run %s died: %s", self.name, run_id, exc)
            with contextlib.suppress(OSError, redis.RedisError):
                if await self.redis.hget(keys.run(run_id), "status") == "queued":
                    await self.queue.put(run_id)
                await self.queue.ack(entry_id)
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
