"""Cluster-wide provider limits in Redis: concurrency, requests and tokens per minute.

Every process sharing the Redis shares each budget (``GENX_LLM_LIMITS``, by model glob). A
concurrency slot is a lease with an expiry, refreshed while the call runs, so a crashed holder's
slot comes back on its own. Token use is estimated before a call and corrected from the usage
the provider reports. A ``Retry-After`` pauses the whole budget for every process, not just the
caller. In each process one pump task per budget asks Redis for slots on behalf of all the
callers waiting there, in arrival order, as many at once as the budget allows; a release in the
process wakes it at once, a release elsewhere is seen within ``POLL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import secrets
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from genx_ray.model import LLMLimit, TenantLimit
from genx_ray.store import keys
from genx_ray.store import scripts as lua

log = logging.getLogger("genx_ray.llm")
POLL_SECONDS = 0.05
PARK_SECONDS = 0.1  # how long a freed slot waits in its process for the next caller
FRESH_SECONDS = 0.25  # how old the news that no other process waits may be
_BATCH = 256  # waiters considered per script call
PAUSE_CACHE_SECONDS = 0.1


def match(limits: Mapping[str, LLMLimit], model: str) -> str | None:
    """The glob whose budget a model uses: an exact name first, then the longest glob."""
    if model in limits:
        return model
    found = [g for g in limits if fnmatch.fnmatchcase(model, g)]
    return max(found, key=len) if found else None


# What a call adds to its run's record when its slot is released: the key, and counters.
Booking = tuple[str, Mapping[str, int]]


# The budget name of a tenant's own LLM budget (GENX_TENANT_LIMITS llm_*), "*" for the others'.
TENANT_BUDGET = "genx-tenant:"


def tenant_budgets(tenant_limits: Mapping[str, TenantLimit]) -> dict[str, LLMLimit]:
    """The tenants' own LLM budgets, by budget name."""
    return {
        f"{TENANT_BUDGET}{tenant}": LLMLimit(concurrency=lim.llm_concurrency,
                                            tpm=lim.llm_tokens_per_minute)
        for tenant, lim in tenant_limits.items()
        if lim.llm_concurrency or lim.llm_tokens_per_minute
    }  # fmt: skip


@dataclass
class Slot:
    glob: str
    id: str
    tokens: int
    tenant: Slot | None = None  # the slot of the caller's tenant's budget, held with this one


class Limiter:
    def __init__(
        self,
        client: Any,
        limits: Mapping[str, LLMLimit],
        lease_seconds: float = 60.0,
    ) -> None:
        self.redis, self.limits = client, dict(limits)
        self.lease_seconds = lease_seconds  # a slot's lease; refreshed every third of it
        self._queues: dict[str, deque[tuple[asyncio.Future[Slot], int]]] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._wakers: dict[str, asyncio.Event] = {}  # set when a slot of this process frees
        self._pauses: dict[str, tuple[float, float]] = {}  # budget -> (checked at, paused until)
        self._held: dict[str, set[str]] = {}  # budget -> ids of the slots this process holds
        # budget -> (whether another process had callers waiting, when this process last
        # asked Redis). While none did, lately, a freed concurrency slot stays in this process:
        # it goes straight to the next caller waiting here, or is parked for PARK_SECONDS for
        # the next one to come (no round trip either way); else it goes back through Redis.
        self._contended: dict[str, tuple[bool, float]] = {}
        self._parked: dict[str, dict[str, tuple[Slot, float]]] = {}  # budget -> id -> until
        self._parker: asyncio.Task[None] | None = None
        # (budget, slot id) -> new lease expiry (ms), written with the next batch: a parked slot
        # gets a short lease (its process may end before it is taken), a slot taken from the
        # park gets a full one again. Nobody waits for these writes.
        self._touches: dict[tuple[str, str], int] = {}
        self._me = secrets.token_hex(8)
        self._refresher: asyncio.Task[None] | None = None
        # Releases are group-committed: those made while a batch is being written go together
        # in the next one (one pipeline, one script call per budget, usage summed per key).
        self._batch: list[tuple[Slot, int, Booking | None]] = []
        self._batch_done: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None

    def budget(self, model: str) -> tuple[str, LLMLimit]:
        """The budget a model draws on: its glob's, or (no limits) its own, which only a
        ``Retry-After`` pause applies to. (A tenant's budget: its own, or ``"*"``'s.)"""
        if model.startswith(TENANT_BUDGET):
            limit = self.limits.get(model) or self.limits.get(f"{TENANT_BUDGET}*")
            return model, limit or LLMLimit()
        glob = match(self.limits, model)
        return (glob, self.limits[glob]) if glob is not None else (model, LLMLimit())

    async def acquire(self, model: str, tokens: int, tenant: str | None = None) -> Slot:
        """Wait for room in the caller's tenant's budget, if it has one, then in the model's
        (and for any pause on it to end): a tenant at its budget holds no model slot while it
        waits, so it slows only itself. :meth:`release` frees both."""
        own_budget = f"{TENANT_BUDGET}{tenant}"
        mine = self.budget(own_budget)[1] if tenant is not None else LLMLimit()
        if not (mine.concurrency or mine.tpm):
            return await self._acquire(model, tokens)
        own = await self._acquire(own_budget, tokens)
        try:
            slot = await self._acquire(model, tokens)
        except BaseException:
            await self.release(own)
            raise
        slot.tenant = own
        return slot

    async def _acquire(self, model: str, tokens: int) -> Slot:
        glob, limit = self.budget(model)
        if not (limit.concurrency or limit.rpm or limit.tpm):
            await self._wait_out_pause(glob)  # no budget to take from: only a pause applies
            return Slot(glob, "", tokens)
        parked = self._parked.get(glob)
        if parked and not self._queues.get(glob) and self._local(glob):
            slot = parked.popitem()[1][0]
            self._held.setdefault(glob, set()).add(slot.id)
            self._touch(slot, self.lease_seconds)
            return Slot(glob, slot.id, tokens)
        waiter: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(glob, deque()).append((waiter, tokens))
        if glob not in self._pumps or self._pumps[glob].done():
            self._pumps[glob] = asyncio.create_task(self._pump(glob, limit))
        else:
            self._wakers.setdefault(glob, asyncio.Event()).set()
        try:
            slot = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted as we were cancelled
                await self.release(waiter.result())
            raise
        if limit.concurrency:
            self._held.setdefault(glob, set()).add(slot.id)
            if self._refresher is None or self._refresher.done():
                self._refresher = asyncio.create_task(self._refresh())
        return slot

    async def _wait_out_pause(self, glob: str) -> None:
        """Sleep through a ``Retry-After`` pause on an unlimited budget. The pause is read from
        Redis at most every ``PAUSE_CACHE_SECONDS`` per budget, not on every call."""
        now = time.monotonic()
        checked, until = self._pauses.get(glob, (0.0, 0.0))
        if now - checked >= PAUSE_CACHE_SECONDS:
            ms = int(await self.redis.pttl(keys.llm_budget(glob).pause))
            until = now + ms / 1000 if ms > 0 else 0.0
            self._pauses[glob] = (now, until)
        if until > now:
            await asyncio.sleep(until - now)

    async def _pump(self, glob: str, limit: LLMLimit) -> None:
        """Grant slots to this process's waiters of one budget, oldest first, in batches."""
        queue = self._queues[glob]
        wake = self._wakers.setdefault(glob, asyncio.Event())
        while True:
            while queue and queue[0][0].done():  # cancelled while waiting
                queue.popleft()
            if not queue:
                return
            wake.clear()
            prefix = secrets.token_hex(6)
            batch = [tokens for _, tokens in list(queue)[:_BATCH]]
            granted, wait_ms, others = await lua.LLM_ACQUIRE(
                self.redis, keys.llm_budget(glob).all,
                [int(time.time() * 1000), prefix, int(self.lease_seconds * 1000),
                 limit.concurrency or 0, limit.rpm or 0, limit.tpm or 0, self._me, *batch],
            )  # fmt: skip
            # A pause (a provider's Retry-After) also keeps slots from staying local.
            contended = int(others) > 0 or (not granted and int(wait_ms) > 0)
            self._contended[glob] = (contended, time.monotonic())
            unused = []
            for i in range(int(granted)):
                slot = Slot(glob, f"{prefix}-{i + 1}", batch[i])
                # The callers still waiting, in order (some may have been cancelled meanwhile,
                # or served by a hand-over while the script ran).
                while queue and queue[0][0].done():
                    queue.popleft()
                if queue:  # the slot keeps the estimate it was booked with, for the release
                    queue.popleft()[0].set_result(slot)
                else:
                    unused.append(slot)
            for slot in unused:  # give them straight back
                await self.release(slot)
            if queue and not granted:
                hint = int(wait_ms) / 1000
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(max(hint, POLL_SECONDS), 5.0))

    async def _refresh(self) -> None:
        """Extend the lease of every slot this process holds, every third of a lease."""
        while any(self._held.values()):
            await asyncio.sleep(self.lease_seconds / 3)
            expiry = int((time.time() + self.lease_seconds) * 1000)
            with contextlib.suppress(Exception):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for glob, ids in self._held.items():
                        if ids:
                            pipe.zadd(
                                keys.llm_budget(glob).concurrency, dict.fromkeys(ids, expiry),
                                xx=True,
                            )  # fmt: skip
                    await pipe.execute()

    async def release(
        self, slot: Slot, actual_tokens: int | None = None, booking: Booking | None = None
    ) -> None:
        """Free the slot, correcting its token estimate, and add ``booking`` (a key and counters
        to increment) in the same write. Returns once written; concurrent releases share it."""
        if slot.tenant is not None:
            own, slot.tenant = slot.tenant, None
            await asyncio.gather(
                self.release(own, actual_tokens), self.release(slot, actual_tokens, booking)
            )
            return
        held = self._held.get(slot.glob)
        if held is not None:
            held.discard(slot.id)
        if slot.id and self._keep(slot):
            slot = Slot(slot.glob, "", slot.tokens)  # the slot lives on; only the booking is left
        if not slot.id and booking is None:
            return  # an unlimited budget, nothing to book
        self._batch.append((slot, -1 if actual_tokens is None else actual_tokens, booking))
        if self._batch_done is None:
            self._batch_done = asyncio.get_running_loop().create_future()
        done = self._batch_done
        self._start_flush()
        await asyncio.shield(done)

    def _local(self, glob: str) -> bool:
        """Whether slots of this budget may change hands in this process without Redis: only
        concurrency counts (no per-minute window to book), and no other process was waiting
        when this one last asked (lately: a process that never asks would never hear)."""
        limit = self.limits.get(glob)
        contended, checked = self._contended.get(glob, (True, 0.0))
        return (
            limit is not None and not (limit.rpm or limit.tpm) and not contended
            and time.monotonic() - checked < FRESH_SECONDS
        )  # fmt: skip

    def _keep(self, slot: Slot) -> bool:
        """Keep a freed slot in this process: for the next caller waiting, or parked."""
        if not self._local(slot.glob):
            return False
        queue = self._queues.get(slot.glob)
        while queue:
            waiter, tokens = queue.popleft()
            if not waiter.done():
                waiter.set_result(Slot(slot.glob, slot.id, tokens))
                return True
        self._parked.setdefault(slot.glob, {})[slot.id] = (slot, time.monotonic() + PARK_SECONDS)
        self._touch(slot, PARK_SECONDS + 1.0)
        if self._parker is None or self._parker.done():
            self._parker = asyncio.create_task(self._unpark())
        return True

    async def _unpark(self) -> None:
        """Give parked slots nobody took back to the budget. (If the loop ends first, their
        short lease frees them.)"""
        while any(self._parked.values()):
            now = time.monotonic()
            for parked in self._parked.values():
                for slot, _ in [entry for entry in parked.values() if entry[1] <= now]:
                    del parked[slot.id]
                    self._touches.pop((slot.glob, slot.id), None)
                    self._batch.append((slot, -1, None))
                    self._start_flush()
            deadlines = [until for parked in self._parked.values() for _, until in parked.values()]
            if deadlines:
                try:
                    await asyncio.sleep(max(0.0, min(deadlines) - now))
                except asyncio.CancelledError:  # the loop is ending: give them all back now
                    left = [slot for parked in self._parked.values() for slot, _ in parked.values()]
                    self._parked.clear()
                    await self._write_last([(slot, -1, None) for slot in left])
                    raise

    async def _write_last(self, batch: list[tuple[Slot, int, Booking | None]]) -> None:
        batch = batch + self._batch
        self._batch = []
        with contextlib.suppress(Exception):
            await self._write(batch, {})

    def _touch(self, slot: Slot, seconds: float) -> None:
        self._touches[(slot.glob, slot.id)] = int((time.time() + seconds) * 1000)
        self._start_flush()

    def _start_flush(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._batch or self._touches:
            batch, done, touches = self._batch, self._batch_done, self._touches
            self._batch, self._batch_done, self._touches = [], None, {}
            try:
                await self._write(batch, touches)
            except asyncio.CancelledError:  # the loop is ending (asyncio.run cancels tasks):
                await self._write_last(batch)  # the releases must still reach Redis
                raise
            except Exception as exc:  # the slots' leases run out on their own
                log.warning("llm limiter: %d release(s) not written: %r", len(batch), exc)
            if done is not None and not done.done():
                done.set_result(None)
            for glob in {slot.glob for slot, _, _ in batch}:
                if glob in self._wakers:
                    self._wakers[glob].set()  # a waiter of this process goes now, not at its poll

    async def _write(
        self, batch: list[tuple[Slot, int, Booking | None]], touches: dict[tuple[str, str], int]
    ) -> None:
        releases: dict[str, list[str | int]] = {}
        counters: dict[str, dict[str, int]] = {}
        for slot, actual, booking in batch:
            if slot.id:
                releases.setdefault(slot.glob, []).extend((slot.id, slot.tokens, actual))
            if booking is not None:
                totals = counters.setdefault(booking[0], {})
                for name, value in booking[1].items():
                    totals[name] = totals.get(name, 0) + value
        async with self.redis.pipeline(transaction=False) as pipe:
            for (glob, slot_id), expiry in touches.items():
                pipe.zadd(keys.llm_budget(glob).concurrency, {slot_id: expiry}, xx=True)
            for glob, args in releases.items():
                budget = keys.llm_budget(glob)
                # EVALSHA straight into the pipeline (the acquire script, run before, loaded it;
                # after a Redis restart the slow path below loads it again).
                pipe.execute_command(
                    "EVALSHA", lua.LLM_RELEASE.sha, 2, budget.concurrency, budget.tokens, *args
                )
            for key, totals in counters.items():
                for name, value in totals.items():
                    pipe.hincrby(key, name, value)
            results = await pipe.execute(raise_on_error=False)
        for (glob, args), result in zip(releases.items(), results[len(touches) :], strict=False):
            if isinstance(result, NoScriptError):
                budget = keys.llm_budget(glob)
                await lua.LLM_RELEASE(self.redis, [budget.concurrency, budget.tokens], args)
            elif isinstance(result, Exception):
                raise result

    async def pause(self, model: str, seconds: float) -> None:
        """Honour a provider's ``Retry-After`` for every process sharing the budget."""
        if seconds > 0:
            glob, now = self.budget(model)[0], time.monotonic()
            self._contended[glob] = (True, now)
            # This process's callers wait it out at once: the pause they would read from Redis
            # is cached (PAUSE_CACHE_SECONDS), and may say "none" from before this one.
            self._pauses[glob] = (now, now + seconds)
            pause = keys.llm_budget(glob).pause
            await lua.LLM_PAUSE(self.redis, [pause], [int(seconds * 1000)])
