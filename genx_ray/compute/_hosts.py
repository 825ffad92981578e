"""A worker's run hosts: where each run goes, and how many hosts there are.

Runs go to hosts in batches (one Ray call per host per batch, not one per run): each to a host
with free room (fewer than ``capacity`` runs), the least loaded first, ready ones before ones
still booting. The call returns once the host has claimed them; they then run on without the
worker. Hosts start as load requires: there is always room for ``spare`` more runs on hosts
already started (a host's process takes seconds to boot, so a burst does not wait for it), up
to ``max_hosts``; a host idle for ``IDLE_RETIRE_SECONDS`` goes when the others have room enough,
and one that has taken ``lifetime`` runs takes no more and goes once its last run ends.

Every host is pinged every ``HEALTH_SECONDS``; it answers with the runs it executes, which is
how the worker knows its load. A host that does not answer in time (frozen, or its node
partitioned) gets no new runs until it answers again, and a batch sent to it that it has not
claimed goes to other hosts (safe: a queued attempt is claimed once, so if the frozen host wakes
up, its claims fail). A host Ray reports dead has its runs handed to ``on_lost`` at once, to be
restarted without waiting for their leases.

The ping's answer also carries the host's metrics (when they moved): what the worker's
``/metrics`` adds to its own (:meth:`RunHosts.reported_metrics`), with the last answer of each
host that is gone, so that no counter goes down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from genx_ray.compute._host import start_host, wait_ready
from genx_ray.observe import Snapshot
from genx_ray.observe import add as add_snapshot
from genx_ray.store import QueueEntry

log = logging.getLogger("genx_ray.hostpool")
HEALTH_SECONDS = 1.0
HEALTH_TIMEOUT = 3.0  # a host slower than this to answer a ping gets no new runs meanwhile
START_TIMEOUT = 10.0  # a batch a host has not claimed by then goes elsewhere
IDLE_RETIRE_SECONDS = 60.0
WARM_HOSTS = 2  # started with the pool, and kept (not retired for idleness)

# What a dead host leaves: (run id, attempt) of what it ran, and its name.
LostRuns = Callable[[list[tuple[str, int]], str], Awaitable[None]]


@dataclass(eq=False)
class Host:
    actor: Any
    name: str
    ready: asyncio.Future[Any]
    runs: dict[str, int] = field(default_factory=dict)  # run id -> attempt, as last reported
    placing: int = 0  # runs sent, not yet answered for
    accepted: int = 0
    healthy: bool = True
    dead: bool = False
    idle_since: float = field(default_factory=time.monotonic)
    reported: Snapshot = field(default_factory=dict)  # its metrics, as last reported
    reported_mark: int | None = None
    started: float = field(default_factory=time.time)  # unix seconds

    @property
    def up(self) -> bool:
        """Its process has started and answered."""
        r = self.ready
        return r.done() and not r.cancelled() and r.exception() is None

    @property
    def load(self) -> int:
        return len(self.runs) + self.placing


class RunHosts:
    def __init__(
        self,
        redis_url: str,
        *,
        on_lost: LostRuns,
        unclaimed: Callable[[str, int | None], Awaitable[bool]],
        capacity: int,
        max_hosts: int,
        lifetime: int,
        resources: dict[str, float] | None = None,
        spare: int = 2,
    ) -> None:
        self.redis_url = redis_url
        self.on_lost = on_lost
        # Whether a run's attempt is still waiting to be claimed (a Redis read, the worker's).
        self.unclaimed = unclaimed
        self.capacity, self.max_hosts, self.lifetime = capacity, max(1, max_hosts), lifetime
        self.resources = resources or None
        self.spare = spare
        self.hosts: list[Host] = []
        self._room = asyncio.Event()  # set when some host has room again
        self._health: asyncio.Task[None] | None = None
        self._closed = False
        self._gone_metrics: Snapshot = {}  # the last of every host that is gone

    @property
    def load(self) -> int:
        return sum(h.load for h in self.hosts)

    @property
    def ready(self) -> int:
        """Hosts up and healthy."""
        return sum(1 for h in self.hosts if h.up and h.healthy)

    def reported_metrics(self) -> list[Snapshot]:
        """The metrics of every host this pool ever had, as last reported."""
        return [self._gone_metrics, *(h.reported for h in list(self.hosts))]

    def describe(self) -> list[dict[str, Any]]:
        """The hosts as the worker table shows them (the console's cluster page): name, runs
        held, started (unix seconds), up and healthy. Safe from another thread (a snapshot)."""
        return [
            {"name": h.name, "runs": len(h.runs), "started": h.started, "up": h.up,
             "healthy": h.healthy and not h.dead}
            for h in list(self.hosts)
        ]  # fmt: skip

    def attempts(self) -> list[tuple[str, int]]:
        """(run id, attempt) of every run on these hosts, as last reported."""
        return [item for h in self.hosts for item in h.runs.items()]

    def start(self) -> None:
        """Start the first hosts and the health check. Two hosts (if allowed) are started ahead,
        warm: a burst spreads over two event loops without waiting for a process to boot."""
        for _ in range(min(WARM_HOSTS, self.max_hosts)):
            self._start()
        self._top_up()
        self._health = asyncio.create_task(self._check_health(), name="genx-host-health")

    async def place(self, entries: Sequence[QueueEntry], worker: str) -> list[bool]:
        """Start each run on a host; whether each was claimed (False: it was not this attempt's
        to run: cancelled while queued, or taken by another)."""
        batches: dict[Host, list[int]] = {}
        for i in range(len(entries)):
            host = await self._pick()
            batches.setdefault(host, []).append(i)
        results = [False] * len(entries)
        await asyncio.gather(
            *(self._send(host, [entries[i] for i in idx], worker, idx, results)
              for host, idx in batches.items())
        )  # fmt: skip
        return results

    async def refresh(self) -> None:
        """Ask every host now what it runs."""
        await asyncio.gather(*(self._ping(h) for h in self.hosts if h.up))

    async def abandon(self, run_ids: list[str]) -> None:
        """Tell the hosts to stop these runs (handed on to their next attempt)."""
        calls = []
        for host in self.hosts:
            mine = [r for r in run_ids if r in host.runs]
            if mine and not host.dead:
                calls.append(host.actor.abandon.remote(mine))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)

    def close(self) -> None:
        """Stop the health check; retire the hosts that run nothing (busy ones finish their runs
        and then exit by themselves, see :data:`genx_ray.compute._host.ORPHAN_EXIT_SECONDS`)."""
        self._closed = True
        if self._health is not None:
            self._health.cancel()
        for host in list(self.hosts):
            if host.load == 0:
                self._retire(host)

    # -- placement ------------------------------------------------------------------------------

    def _open(self) -> list[Host]:
        return [
            h for h in self.hosts
            if not h.dead and h.healthy and h.load < self.capacity and h.accepted < self.lifetime
        ]  # fmt: skip

    async def _pick(self) -> Host:
        """A host with room for one more run, its room taken now."""
        while True:
            candidates = self._open()
            pick = min([h for h in candidates if h.up] or candidates, key=lambda h: h.load,
                       default=None)  # fmt: skip
            if pick is None and len(self.hosts) < self.max_hosts:
                pick = self._start()
            if pick is not None:
                pick.placing += 1
                pick.accepted += 1
                self._top_up()
                return pick
            self._room.clear()  # every host is full: wait for room
            await self._room.wait()

    async def _send(
        self, host: Host, entries: list[QueueEntry], worker: str, idx: list[int],
        results: list[bool],
    ) -> None:  # fmt: skip
        import ray

        batch = [(e.run_id, e.attempt, e.workflow) for e in entries]
        try:
            await asyncio.shield(host.ready)
            call = asyncio.ensure_future(host.actor.start.remote(batch, worker))
            done, _ = await asyncio.wait({call}, timeout=START_TIMEOUT)
            if done:
                for i, entry, claimed in zip(idx, entries, call.result(), strict=True):
                    results[i] = claimed
                    if claimed:
                        host.runs[entry.run_id] = entry.attempt or 0
                return
            call.add_done_callback(_ignore)  # claims it makes if it wakes up are real
            host.healthy = False
            log.warning("run host %s did not claim %d run(s) in time; placing them elsewhere",
                        host.name, len(entries))  # fmt: skip
        except ray.exceptions.RayActorError:
            await self._lost(host)
        except Exception as exc:
            log.warning("run host %s did not start: %s", host.name, exc)
            await self._lost(host)
        finally:
            host.placing -= len(entries)
        again = [(i, e) for i, e in zip(idx, entries, strict=True)
                 if await self.unclaimed(e.run_id, e.attempt)]  # fmt: skip
        if again:
            retried = await self.place([e for _, e in again], worker)
            for (i, _), claimed in zip(again, retried, strict=True):
                results[i] = claimed

    def _top_up(self) -> None:
        """Start hosts until there is room for ``spare`` more runs (within ``max_hosts``)."""
        while not self._closed and len(self.hosts) < self.max_hosts:
            room = sum(
                min(self.capacity - h.load, self.lifetime - h.accepted) for h in self._open()
            )
            if room >= self.spare:
                return
            self._start()

    def _start(self) -> Host:
        actor = start_host(self.redis_url, self.resources)
        ready = asyncio.ensure_future(wait_ready(actor))
        ready.add_done_callback(_ignore)
        host = Host(actor, actor._actor_id.hex()[:12], ready)
        self.hosts.append(host)
        return host

    async def _lost(self, host: Host) -> None:
        if host.dead:
            return
        host.dead = True
        if host in self.hosts:
            self.hosts.remove(host)
            add_snapshot(self._gone_metrics, host.reported)
        log.warning("run host %s is gone, with %d run(s)", host.name, len(host.runs))
        self._top_up()
        self._room.set()
        if host.runs:
            await self.on_lost(list(host.runs.items()), host.name)

    def _retire(self, host: Host) -> None:
        import ray

        if host in self.hosts:
            self.hosts.remove(host)
            add_snapshot(self._gone_metrics, host.reported)
        host.dead = True
        with contextlib.suppress(Exception):
            ray.kill(host.actor)

    # -- health ---------------------------------------------------------------------------------

    async def _ping(self, host: Host) -> None:
        import ray

        try:
            report = await asyncio.wait_for(
                host.actor.ping.remote(host.reported_mark), HEALTH_TIMEOUT
            )
        except TimeoutError:
            if host.healthy:
                log.warning("run host %s does not answer; no new runs for it", host.name)
            host.healthy = False
            return
        except ray.exceptions.RayActorError:
            await self._lost(host)
            return
        if not host.healthy:
            log.warning("run host %s answers again", host.name)
        host.healthy = True
        if report.get("metrics") is not None:
            host.reported, host.reported_mark = report["metrics"], report["metrics_mark"]
        before = host.load
        host.runs = {run_id: attempt for run_id, attempt in report["runs"]}
        if host.load < before:
            self._room.set()
        if host.load == 0 and before:
            host.idle_since = time.monotonic()

    async def _check_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_SECONDS)
            await asyncio.gather(*(self._ping(h) for h in self.hosts if h.up))
            for host in list(self.hosts):
                if host.load == 0 and host.accepted >= self.lifetime:
                    self._retire(host)  # its last run ended: a fresh process takes over
            self._retire_idle()
            self._top_up()

    def _retire_idle(self) -> None:
        now = time.monotonic()
        for host in list(self.hosts):
            if len(self.hosts) <= WARM_HOSTS:
                return
            if host.load or now - host.idle_since < IDLE_RETIRE_SECONDS or not host.up:
                continue
            others = sum(self.capacity - h.load for h in self._open() if h is not host)
            if others >= self.spare:
                self._retire(host)


def _ignore(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved, so asyncio does not warn
