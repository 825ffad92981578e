"""``genx worker``: takes runs from the Redis queue and executes them.

Runs execute on the worker's run hosts (``hosts="ray"``: detached Ray actors, each executing
many runs at once, see :mod:`genx_ray.compute`), or in this process
(``hosts="inline"``: no Ray at all, for small setups, CI of workflow code, and tests). Either way
every run holds a heartbeat lease, and every worker also runs a supervisor that restarts runs
whose host died, and delivers webhooks.

Admission: at most ``max_runs`` runs per worker, and ``GENX_MAX_RUNNING`` across every worker on
the same Redis: a run is admitted by one script that counts the watched runs and registers it.

Host death: when Ray reports the host of a run dead, the run is restarted at once (attempt + 1,
from its journal), not when its lease expires. A worker whose runs die with it (inline hosts, or
a local Ray that it started) says so in the worker table, so when it dies the other workers'
supervisors restart its runs at once too.

Drain: on SIGTERM the worker stops taking runs, lets running ones finish within the drain timeout,
then hands the rest back to the queue as a new attempt (their journal keeps every completed step)
and tells their hosts to stop them.

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
import threading
import time
from typing import Any

import redis

from genx_ray.compute import RunHosts, cluster_cpus
from genx_ray.engine import Executor
from genx_ray.flow import Registry
from genx_ray.flow import registry as default_registry
from genx_ray.model import (
    Concurrency,
    Fenced,
    InvalidTransition,
    RunNotFound,
    Settings,
    WorkflowNotFound,
)
from genx_ray.observe import OutageLog, exposition, serve_http, setup
from genx_ray.service._supervisor import WORKER_BEAT_SECONDS, Supervisor
from genx_ray.service._webhooks import WebhookSender
from genx_ray.store import (
    WORKER_DEAD_SECONDS,
    ConcurrencyKeys,
    QueueEntry,
    RunQueue,
    RunStore,
    async_redis,
    concurrency_key,
    keys,
    queue_gauges,
    sync_redis,
    worker_alive,
)
from genx_ray.store import scripts as lua

log = logging.getLogger("genx_ray.worker")
TAKE_BATCH = 64  # queue entries taken per read, at most
WHY_HEAD = 20  # runs at the head of the queue told why they wait, when the cap is reached
IDLE_POLL_SECONDS = 0.02  # how long a worker that found the queue empty waits to look again
# Entries taken and not yet started (claimed by a host, or handed back), at most: what a worker
# that dies can strand (others take them over once it is known dead, see genx_ray.store._queue).
IN_FLIGHT = 2 * TAKE_BATCH
# Debug hook (tests, bench): log each batch taken, then hold it this many seconds before placing
# it, so that a test can kill the worker between taking runs and starting them.
HOLD_TAKEN_ENV = "GENX_DEBUG_HOLD_TAKEN"


ISOLATED_MAX_RUNS = 32  # with a process per run (GENX_HOST_RUNS=1): ~110 MB each


def default_max_runs(settings: Settings, hosts: str, cpus: int = 1) -> int:
    """What a worker can hold: a host per CPU of the cluster (two at least), each with room for
    ``GENX_HOST_RUNS`` (a host is one event loop: more hosts than cores only add memory), or
    (inline) what this process's loop can. Small hosts (a few runs each, for isolation) get
    more processes instead, up to ``ISOLATED_MAX_RUNS`` runs."""
    if hosts != "ray":
        return settings.host_runs
    return max(ISOLATED_MAX_RUNS, settings.host_runs * max(2, cpus))


class Worker:
    def __init__(
        self,
        client: Any,
        *,
        registry: Registry | None = None,
        settings: Settings | None = None,
        max_runs: int | None = None,
        drain_timeout: float = 30.0,
        name: str | None = None,
        hosts: str = "inline",
        redis_url: str | None = None,
        fate: str | None = None,
    ) -> None:
        """``fate``: ``shared`` when this worker's runs die with it (inline hosts, a local Ray),
        ``own`` when they outlive it (a Ray cluster it joined); by default read off ``hosts``
        and ``GENX_RAY_ADDRESS``."""
        if hosts not in ("inline", "ray"):
            raise ValueError(f"hosts must be 'inline' or 'ray', not {hosts!r}")
        if hosts == "ray" and not redis_url:
            raise ValueError("hosts='ray' needs the redis_url the run hosts connect to")
        self.host_mode = hosts
        # Without a URL (inline, embedded in tests) runs hold no lease and are not supervised.
        self.redis_url = redis_url
        self.redis = client
        self.registry = registry or default_registry
        self.settings = settings or Settings.current()
        self.max_runs = max_runs or default_max_runs(
            self.settings, hosts, cluster_cpus() if hosts == "ray" else 1
        )
        self.drain_timeout = drain_timeout
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.started = time.time()
        self.fate = fate or (
            "shared" if hosts == "inline" or self.settings.ray_address == "local" else "own"
        )
        # Entries a dead worker took are taken over once its heartbeat is this old: never later
        # than the lease, the bound a started run's restart has.
        self.queue = RunQueue(
            client, dead_after=min(WORKER_DEAD_SECONDS, float(self.settings.lease_seconds))
        )
        self.concurrency = ConcurrencyKeys(client, self.queue, leased=redis_url is not None)
        hold = os.environ.get(HOLD_TAKEN_ENV)
        self._hold_taken = float(hold) if hold else 0.0
        self.runs = RunStore(
            client, maxlen=self.settings.stream_maxlen,
            retention_seconds=self.settings.retention_seconds,
        )  # fmt: skip
        self.run_hosts: RunHosts | None = None
        self.executor: Executor | None = None
        self._placing = 0  # runs taken from the queue, not yet claimed or refused
        self._said_why_at = 0.0
        self._stopping = asyncio.Event()
        self._batches: set[asyncio.Task[None]] = set()
        self.supervisor = Supervisor(client, self.settings)
        self.supervisor.concurrency = self.concurrency
        self.webhooks = WebhookSender(client, self.settings, self.name)

    @property
    def running(self) -> int:
        """Runs executing on this worker's hosts (or in it), and being placed."""
        if self.run_hosts is not None:
            return self.run_hosts.load + self._placing
        return (self.executor.load if self.executor is not None else 0) + self._placing

    def stop(self) -> None:
        """Stop taking runs; :meth:`serve` then drains and returns."""
        self._stopping.set()

    async def render_metrics(self) -> bytes:
        """``GET /metrics``: this worker's metrics, its run hosts' (as they last reported them),
        and the queue's state read from Redis now."""
        gauges, labelled = await queue_gauges(self.redis)
        gauges["genx_runs_running"] = self.running
        gauges["genx_runs_held_by_concurrency_key"] = await self.concurrency.held()
        hosts = self.run_hosts.reported_metrics() if self.run_hosts is not None else []
        return exposition(gauges, hosts, labelled)

    async def serve(self) -> None:
        await self.queue.set_weights(
            {t: lim.weight for t, lim in self.settings.tenant_limits.items() if lim.weight}
        )
        if self.host_mode == "ray":
            assert self.redis_url is not None
            self.run_hosts = RunHosts(
                self.redis_url, on_lost=self._host_died, unclaimed=self._unclaimed,
                capacity=self.settings.host_runs,
                max_hosts=-(-self.max_runs // self.settings.host_runs),
                lifetime=self.settings.host_max_runs,
                resources=dict(self.settings.host_resources),
            )  # fmt: skip
            self.run_hosts.start()
        else:
            self.executor = Executor(
                self.redis, self.registry, self.settings, redis_url=self.redis_url
            )
        log.info("worker %s: taking runs (at most %d at once)", self.name, self.max_runs)
        beat = _Heartbeat(self) if self.redis_url else None
        background = [
            asyncio.create_task(self.supervisor.serve(self._stopping)),
            asyncio.create_task(self.webhooks.serve(self._stopping)),
        ]
        try:
            await self._take_runs()
            if self._batches:
                await asyncio.gather(*self._batches, return_exceptions=True)
            await self._drain()
        finally:
            if beat is not None:
                await asyncio.to_thread(beat.stop, clean=self.running == 0)
            if self.run_hosts is not None:
                self.run_hosts.close()
            if self.executor is not None:
                await self.executor.close()
            await asyncio.gather(*background)

    async def _take_runs(self) -> None:
        outage = OutageLog(f"worker {self.name}: queue", log)
        while not self._stopping.is_set():
            # Room on its hosts, and no more in flight than it starts in a moment: what a death
            # between taking runs and starting them strands.
            free = min(self.max_runs - self.running, IN_FLIGHT - self._placing)
            if free > 0 and self.settings.max_running:
                try:
                    free = min(free, await self._cluster_room())
                except Exception as exc:  # as a take's failure, below
                    outage.failed(exc)
                    await asyncio.sleep(1)
                    continue
            if free <= 0:
                if self.settings.max_running:
                    await self._say_why("max_running")
                await asyncio.sleep(0.05)  # room comes back as runs end (hosts report it)
                continue
            try:
                taken = await self.queue.take(self.name, min(free, TAKE_BATCH))
            except Exception as exc:  # whatever a client raises: a worker that stopped taking
                outage.failed(exc)  # runs would look alive and do nothing
                await asyncio.sleep(1)
                continue
            outage.ok()
            if not taken:
                await asyncio.sleep(IDLE_POLL_SECONDS)
                continue
            if self._hold_taken:
                log.warning("worker %s: took %d run(s); holding them %ss (%s)", self.name,
                            len(taken), self._hold_taken, HOLD_TAKEN_ENV)  # fmt: skip
            if self._stopping.is_set():  # stopped while taking: not ours
                for entry in taken:
                    await self._put_back(entry)
                break
            # Placed in the background: the next entries are read meanwhile. Fresh runs go as
            # one batch; the others (a restart to check, a cluster-wide slot to wait for) each
            # when they are ready, so none waits for another.
            fresh = [e for e in taken if self._fresh(e)]
            batches = [fresh] if fresh else []
            # Runs with a concurrency key go as one batch admitted in queue order (FIFO per
            # key); the others each on its own.
            keyed = [e for e in taken if e.workflow and self._limit(e.workflow) is not None]
            batches += [keyed] if keyed else []
            batches += [[e] for e in taken if not self._fresh(e) and e not in keyed]
            for batch in batches:
                self._placing += len(batch)
                task = asyncio.create_task(self._place(batch))
                self._batches.add(task)
                task.add_done_callback(self._batches.discard)

    def _fresh(self, entry: QueueEntry) -> bool:
        """A first attempt whose entry says all, with no cluster-wide cap or concurrency key
        to wait for."""
        if entry.attempt != 1 or entry.workflow is None or self.settings.max_running:
            return False
        return self._limit(entry.workflow) is None

    def _limit(self, workflow: str) -> Concurrency | None:
        try:
            return self.registry.get(workflow).concurrency
        except WorkflowNotFound:
            return None  # the claim says so

    async def _place(self, taken: list[QueueEntry]) -> None:
        """Start a batch of runs: each on a host (or here), acknowledged once claimed (from then
        on its lease covers it) or refused (not its attempt's to run any more)."""
        try:
            if self._hold_taken:
                await asyncio.sleep(self._hold_taken)
            if all(self._fresh(e) for e in taken):
                ready = taken
            elif len(taken) > 1:  # keyed: one after the other, in queue order
                ready = [r for e in taken if (r := await self._ready(e)) is not None]
            else:
                ready = [e for e in await asyncio.gather(*(self._ready(e) for e in taken)) if e]
            if self.run_hosts is not None:
                await self.run_hosts.place(ready, self.name)
            elif self.executor is not None:
                runs = [(e.run_id, e.attempt, e.workflow) for e in ready]
                await self.executor.start_many(runs, self.name)
            await self.queue.ack(*(e.id for e in ready))
        except Exception as exc:  # Redis down, say: the entries stay pending, claimed later
            log.warning("worker %s: placing %d run(s) failed: %r", self.name, len(taken), exc)
        finally:
            self._placing -= len(taken)

    async def _ready(self, entry: QueueEntry) -> QueueEntry | None:
        """The entry with its attempt and workflow, if it is to run here now; None when it went
        back to the queue (another deployment's, or over the cluster-wide cap) or is gone."""
        if entry.attempt is None or entry.attempt > 1 or entry.workflow is None:
            attempt, workflow, version = await self.redis.hmget(
                keys.run(entry.run_id), "attempt", "workflow", "version"
            )
            if attempt is None:
                await self.queue.ack(entry.id)  # expired, or never existed
                return None
            entry = QueueEntry(entry.id, entry.run_id, int(attempt), str(workflow),
                               entry.priority, entry.tenant, entry.queued_us)  # fmt: skip
            if version and await self._belongs_elsewhere(str(version)):
                await self._later(entry)
                return None
        limit = self._limit(str(entry.workflow))
        if limit is not None:
            assert entry.attempt is not None
            raw = await self.redis.hget(keys.run(entry.run_id), "input")
            key = concurrency_key(str(entry.workflow), limit.value(json.loads(raw or "null")))
            if not await self.concurrency.admit(key, limit.limit, entry.run_id, entry.attempt,
                                                entry):  # fmt: skip
                # Filed under its key (it starts when one with its key ends): off the queue.
                await self.runs.queued_because(entry.run_id, entry.attempt, "concurrency_key")
                await self.queue.ack(entry.id)
                return None
        if not await self._admit(entry.run_id):
            await self.runs.queued_because(entry.run_id, entry.attempt, "max_running")
            await self._later(entry)
            return None
        return entry

    async def _host_died(self, runs: list[tuple[str, int]], host: str) -> None:
        """Restart the runs of a host Ray says is dead now: its leases mean nothing."""
        cap = self.settings.max_attempts
        for run_id, attempt in runs:
            with contextlib.suppress(OSError, redis.RedisError):
                losses = int(await self.redis.hget(keys.run(run_id), "lost") or 0) + 1
                outcome = await self.supervisor.runs.reap(
                    run_id, attempt, max_attempts=cap, host_dead=True,
                    reason=f"its run host {host} died; {losses} of {cap} attempts used",
                )  # fmt: skip
                log.warning("worker %s: run %s %s (host %s died)", self.name, run_id, outcome,
                            host)  # fmt: skip

    async def _unclaimed(self, run_id: str, attempt: int | None) -> bool:
        status, current = await self.redis.hmget(keys.run(run_id), "status", "attempt")
        return status == "queued" and (attempt is None or current == str(attempt))

    async def _later(self, entry: QueueEntry) -> None:
        """Not now (another deployment's, or over the cluster-wide cap): back on the queue."""
        await asyncio.sleep(0.2)
        await self._put_back(entry)

    async def _put_back(self, entry: QueueEntry) -> None:
        """Back on the queue, where it was (its priority, its place in its tenant's FIFO)."""
        at = entry.queued_us / 1e6 if entry.queued_us is not None else None
        # As it came (a worker that takes it checks again what _ready checked: not "fresh").
        came = QueueEntry.of(entry.id)
        await self.queue.put(came.run_id, came.attempt, came.workflow, tenant=came.tenant,
                             priority=came.priority, queued_at=at)  # fmt: skip
        await self.queue.ack(entry.id)

    async def _say_why(self, reason: str) -> None:
        """At the cap: tell the runs at the head of the queue why they wait (a ``run.queued``
        with ``reason``, once per attempt), at most once a second; a run further back is told
        when it gets to the head."""
        now = time.monotonic()
        if now - self._said_why_at < 1.0:
            return
        self._said_why_at = now
        with contextlib.suppress(OSError, redis.RedisError):
            for entry in await self.queue.peek(WHY_HEAD):
                await self.runs.queued_because(entry.run_id, entry.attempt, reason)

    async def _cluster_room(self) -> int:
        """Runs this worker may take now under ``GENX_MAX_RUNNING``: the cap less the live
        leases and what this worker is admitting. Taking no more than that keeps the queue the
        one place that orders runs (an urgent run is not stuck behind runs a worker holds)."""
        cap = self.settings.max_running
        if not cap:
            return self.max_runs
        live = time.time() - self.settings.lease_seconds
        return cap - int(await self.redis.zcount(keys.LEASES, live, "+inf")) - self._placing

    async def _admit(self, run_id: str) -> bool:
        """A cluster-wide slot (``GENX_MAX_RUNNING``) for the run, if one is free now."""
        cap = self.settings.max_running
        if not cap:
            return True
        now = time.time()
        # A stale lease (a dead host the supervisor has not requeued yet) holds no slot.
        live = now - self.settings.lease_seconds
        return bool(await lua.ADMIT(self.redis, [keys.LEASES], [cap, run_id, now, live]))

    async def _belongs_elsewhere(self, version: str) -> bool:
        if version == self.settings.deployment:
            return False
        now = time.time()
        for raw in (await self.redis.hgetall(keys.WORKERS)).values():
            w = json.loads(raw)
            if w["version"] == version and not w["draining"] and worker_alive(w, now):
                return True
        return False

    async def _drain(self) -> None:
        """Let running runs finish within the drain timeout; hand the rest back."""
        deadline = time.monotonic() + self.drain_timeout
        if self.running:
            log.info("worker %s: draining %d run(s)", self.name, self.running)
        while self.running and time.monotonic() < deadline:  # noqa: ASYNC110 - hosts report it
            await asyncio.sleep(0.05)
        if self.run_hosts is not None:
            await self.run_hosts.refresh()
            left = self.run_hosts.attempts()
        else:
            left = self.executor.attempts() if self.executor is not None else []
        handed = [run_id for run_id, attempt in left if await self._hand_back(run_id, attempt)]
        if self.run_hosts is not None:
            await self.run_hosts.abandon(handed)
        elif self.executor is not None:
            for run_id in handed:
                self.executor.abandon(run_id)

    async def _hand_back(self, run_id: str, attempt: int) -> bool:
        """Requeue a run this worker will not finish, as its next attempt."""
        try:
            await self.runs.requeue(run_id, attempt, f"worker {self.name} drained")
            return True
        except (RunNotFound, InvalidTransition, Fenced):
            return False  # it ended meanwhile, or moved on


class _Heartbeat:
    """The worker's entry in the worker table, written from a thread twice a second (a busy
    loop cannot make a live worker look dead): its deployment, whether it drains, whether its
    runs die with it."""

    def __init__(self, worker: Worker) -> None:
        assert worker.redis_url is not None
        self.worker = worker
        self.redis = sync_redis(worker.redis_url)
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._run, name="genx-worker-beat", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        w = self.worker
        entry = {
            "version": w.settings.deployment, "draining": w._stopping.is_set(),
            "seen": time.time(), "hosts": w.host_mode, "fate": w.fate, "runs": w.running,
            "hosts_ready": (w.run_hosts.ready if w.run_hosts is not None
                            else int(w.executor is not None)),
            "started": w.started,
            "run_hosts": w.run_hosts.describe() if w.run_hosts is not None else [
                {"name": f"{w.name} (inline)", "runs": w.running, "started": w.started,
                 "up": w.executor is not None, "healthy": True}],
        }  # fmt: skip
        with contextlib.suppress(OSError, redis.RedisError):
            self.redis.hset(keys.WORKERS, w.name, json.dumps(entry))

    def _run(self) -> None:
        while not self._stop.wait(WORKER_BEAT_SECONDS):
            self._write()

    def stop(self, *, clean: bool) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with contextlib.suppress(OSError, redis.RedisError):
            if clean:
                self.redis.hdel(keys.WORKERS, self.worker.name)
            else:
                self._write()
        self.redis.close()


async def serve_worker(
    redis_url: str,
    *,
    max_runs: int | None = None,
    drain_timeout: float = 30.0,
    hosts: str = "ray",
    metrics_port: int | None = None,
) -> None:
    """Run a worker until SIGTERM or SIGINT, then drain. With ``metrics_port``, serve
    ``GET /metrics`` there (all interfaces) meanwhile."""
    setup("worker")
    settings = Settings.current()
    registry = default_registry.load(settings.workflows)
    if hosts == "ray":
        from genx_ray.compute import ensure_ray

        # On this (the main) thread, though it holds the loop for the seconds Ray takes to
        # start: nothing else runs yet, and a Ray joined from another thread takes 12-15 s to
        # shut down when the worker exits (measured), where it takes ~1 s from the main thread.
        ensure_ray(settings.ray_address, redis_url=redis_url)
    client = async_redis(redis_url)
    worker = Worker(
        client, registry=registry, settings=settings, max_runs=max_runs,
        drain_timeout=drain_timeout, hosts=hosts, redis_url=redis_url,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    server = await serve_http(metrics_port, worker.render_metrics) if metrics_port else None
    try:
        await worker.serve()
    finally:
        if server is not None:
            server.close()
        await client.aclose()
