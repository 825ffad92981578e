"""A worker's run hosts: where each run goes, and how many hosts there are.

A run goes to a host with free room (fewer than ``capacity`` runs), the least loaded first,
ready ones before ones still booting. Hosts start as load requires: there is always room for
``spare`` more runs on hosts already started (a host's process takes seconds to boot, so a
burst does not wait for it), up to ``max_hosts``; a host idle for ``IDLE_RETIRE_SECONDS`` goes
when the others have room enough, and one that has taken ``lifetime`` runs takes no more and
goes once its last run ends.

Every host is pinged every ``HEALTH_SECONDS``: one that does not answer in time (frozen, or its
node partitioned) gets no new runs until it answers again, and a run sent to it that it has not
claimed yet goes to another host (safe: a queued attempt is claimed once, so if the frozen host
wakes up, its claim fails). A host Ray reports dead raises :class:`HostDied` from
:meth:`HostPool.run` at once, so its runs are restarted without waiting for their leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from genx_ray.errors import GenxError
from genx_ray.host import start_host

log = logging.getLogger("genx_ray.hostpool")
HEALTH_SECONDS = 1.0
HEALTH_TIMEOUT = 3.0  # a host slower than this to answer a ping gets no new runs meanwhile
IDLE_RETIRE_SECONDS = 60.0


class HostDied(GenxError):
    """The run host executing a run died (Ray reported it: process killed, node lost)."""

    code = "host_died"

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"run host {name} died: {reason}")
        self.name = name


@dataclass(eq=False)
class Host:
    actor: Any
    name: str
    ready: asyncio.Future[Any]
    load: int = 0
    accepted: int = 0
    healthy: bool = True
    dead: bool = False
    idle_since: float = field(default_factory=time.monotonic)
    runs: set[str] = field(default_factory=set)

    @property
    def up(self) -> bool:
        """Its process has started and answered."""
        r = self.ready
        return r.done() and not r.cancelled() and r.exception() is None


class HostPool:
    def __init__(
        self,
        redis_url: str,
        *,
        unclaimed: Callable[[str, int | None], Awaitable[bool]],
        capacity: int,
        max_hosts: int,
        lifetime: int,
        resources: dict[str, float] | None = None,
        spare: int = 2,
    ) -> None:
        self.redis_url = redis_url
        # Whether a run's attempt is still waiting to be claimed (a Redis read, the worker's).
        self.unclaimed = unclaimed
        self.capacity, self.max_hosts, self.lifetime = capacity, max(1, max_hosts), lifetime
        self.resources = resources or None
        self.spare = spare
        self.hosts: list[Host] = []
        self._room = asyncio.Event()  # set when a run ends: room on some host
        self._health: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def load(self) -> int:
        return sum(h.load for h in self.hosts)

    @property
    def ready(self) -> int:
        """Hosts up and healthy."""
        return sum(1 for h in self.hosts if h.up and not h.dead and h.healthy)

    def start(self) -> None:
        """Start the first hosts (enough for ``spare`` runs) and the health check."""
        self._top_up()
        self._health = asyncio.create_task(self._check_health(), name="genx-host-health")

    async def run(
        self, run_id: str, worker: str, attempt: int | None, workflow: str | None
    ) -> str | None:
        """Execute the run on a host and wait for its end (what the host returns)."""
        import ray

        while True:
            host = await self._place()  # its room is taken for this run already
            host.runs.add(run_id)
            self._top_up()
            call = asyncio.ensure_future(
                host.actor.execute.remote(run_id, worker, attempt, workflow)
            )
            try:
                while True:
                    done, _ = await asyncio.wait({call}, timeout=HEALTH_SECONDS)
                    if done:
                        result: str | None = call.result()
                        return result
                    if not host.healthy and await self.unclaimed(run_id, attempt):
                        log.warning("run %s: its host %s does not answer; placing it elsewhere",
                                    run_id, host.name)  # fmt: skip
                        call.add_done_callback(_ignore)  # it answers 'skipped' if it wakes up
                        break
            except ray.exceptions.RayActorError as exc:
                self._lost(host)
                raise HostDied(host.name, type(exc).__name__) from None
            finally:
                self._release(host, run_id)

    def _release(self, host: Host, run_id: str) -> None:
        host.load -= 1
        host.runs.discard(run_id)
        if host.load == 0:
            host.idle_since = time.monotonic()
            if host.accepted >= self.lifetime:
                self._retire(host)
        self._room.set()

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
        and then exit by themselves, see :data:`genx_ray.host.ORPHAN_EXIT_SECONDS`)."""
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

    async def _place(self) -> Host:
        while True:
            candidates = self._open()
            ready = [h for h in candidates if h.up]
            pick = min(ready or candidates, key=lambda h: h.load, default=None)
            if pick is None and len(self.hosts) < self.max_hosts:
                pick = self._start()
            if pick is not None:
                pick.load += 1  # taken now: runs placed while it boots go elsewhere
                pick.accepted += 1
                try:
                    await asyncio.shield(pick.ready)
                except Exception as exc:
                    log.warning("run host %s did not start: %s", pick.name, exc)
                    pick.load -= 1
                    self._lost(pick)
                    continue
                return pick
            self._room.clear()  # every host is full: wait for a run to end
            await self._room.wait()

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
        from genx_ray.host import wait_ready

        actor = start_host(self.redis_url, self.resources)
        name = actor._actor_id.hex()[:12]
        ready = asyncio.ensure_future(wait_ready(actor))
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
        host = Host(actor, name, ready)
        self.hosts.append(host)
        return host

    def _lost(self, host: Host) -> None:
        if not host.dead:
            host.dead = True
            if host in self.hosts:
                self.hosts.remove(host)
            log.warning("run host %s is gone", host.name)
            self._top_up()

    def _retire(self, host: Host) -> None:
        import ray

        if host in self.hosts:
            self.hosts.remove(host)
        host.dead = True
        with contextlib.suppress(Exception):
            ray.kill(host.actor)

    # -- health ---------------------------------------------------------------------------------

    async def _check_health(self) -> None:
        import ray

        async def ping(host: Host) -> None:
            try:
                await asyncio.wait_for(host.actor.ping.remote(), HEALTH_TIMEOUT)
                if not host.healthy:
                    log.warning("run host %s answers again", host.name)
                host.healthy = True
            except TimeoutError:
                if host.healthy:
                    log.warning("run host %s does not answer; no new runs for it", host.name)
                host.healthy = False
            except ray.exceptions.RayActorError:
                self._lost(host)

        while True:
            await asyncio.sleep(HEALTH_SECONDS)
            await asyncio.gather(*(ping(h) for h in self.hosts if h.ready.done()))
            self._retire_idle()
            self._top_up()

    def _retire_idle(self) -> None:
        now = time.monotonic()
        for host in list(self.hosts):
            if host.load or now - host.idle_since < IDLE_RETIRE_SECONDS or not host.ready.done():
                continue
            others = sum(self.capacity - h.load for h in self._open() if h is not host)
            if others >= self.spare:
                self._retire(host)


def _ignore(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved, so asyncio does not warn
