"""Run records in Redis: create (idempotently), get, list (newest first, filtered, cursor-paginated)
and every status change.

Statuses move ``queued -> running -> succeeded | failed | cancelled`` (a restart moves ``running``
back to ``queued`` with ``attempt + 1``); nothing leaves a terminal status. Every change goes
through this module, each as one Lua script that writes the status and its event together: the
terminal status is never visible without its event, and readers that see a terminal status know
the stream is complete. Writes on behalf of an attempt are fenced by its number.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pydantic import BaseModel, JsonValue
from redis.exceptions import NoScriptError, ResponseError

from genx_ray.model import (
    DEFAULT_PRIORITY,
    DEFAULT_TENANT,
    MAX_RERUN_LINKS,
    TERMINAL,
    ErrorInfo,
    Fenced,
    IdempotencyConflict,
    InputInvalid,
    InputReceivedEvent,
    InvalidTransition,
    JournalEntry,
    NotWaitingForInput,
    Run,
    RunCancelledEvent,
    RunFailedEvent,
    RunId,
    RunNotFound,
    RunQueuedEvent,
    RunRestartedEvent,
    RunResumedEvent,
    RunScheduledEvent,
    RunStartedEvent,
    RunStatus,
    StepRef,
    StepView,
    UserError,
    canonical_hash,
    dump_event,
    new_run_id,
)
from genx_ray.observe import observer
from genx_ray.store import _keys as keys
from genx_ray.store import _scripts as lua
from genx_ray.store._connections import is_cluster
from genx_ray.store._history import read_history, read_journal
from genx_ray.store._queue import put_commands
from genx_ray.store._quotas import Quotas
from genx_ray.store._search import RunFilter, count, find_all, search

__all__ = ["DEFAULT_TENANT", "TERMINAL", "Run", "RunStatus", "RunStore"]

# The statuses a cancel ends at once (no host holds the run).
_CANCELLABLE = frozenset({"queued", "scheduled", "waiting"})
IDEMPOTENCY_TTL = 24 * 3600  # how long an Idempotency-Key maps to its run, at most
# A key's run missing this long after its id was made has expired (not still being created).
IDEMPOTENCY_GRACE_SECONDS = 60.0
MAX_DELAY_SECONDS = 366 * 24 * 3600  # how far ahead a run may be scheduled


@dataclass(frozen=True, slots=True)
class Claim:
    """An attempt to claim (see :meth:`RunStore.claim_many`)."""

    run_id: str
    attempt: int
    event: RunStartedEvent
    fields: dict[str, str]


# A claimed run, and its journal (step id -> recorded entry).
Claimed = tuple[Run, dict[str, str]]


def _pairs(fields: dict[str, str] | None) -> list[str]:
    return [item for pair in (fields or {}).items() for item in pair]


class RunStore:
    def __init__(
        self,
        client: Any,
        *,
        maxlen: int = 100_000,
        retention_seconds: int = 7 * 24 * 3600,
    ) -> None:
        self.redis = client
        self.maxlen = maxlen
        self.retention_seconds = retention_seconds

    # -- creating ------------------------------------------------------------------------------

    async def create(
        self,
        workflow: str,
        input: JsonValue,
        *,
        tenant: str = DEFAULT_TENANT,
        run_id: RunId | None = None,
        enqueue: bool = False,
        extra: dict[str, str] | None = None,
        start_at: float | None = None,
        tags: dict[str, str] | None = None,
        journal: dict[str, str] | None = None,
        also: Sequence[lua.Call] = (),
        fresh: bool = False,
        priority: int = DEFAULT_PRIORITY,
    ) -> Run:
        """Write a queued run and its ``run.queued`` event; put it on the run queue if asked.
        With ``start_at`` (unix seconds, in the future), a ``scheduled`` run instead, with its
        ``run.scheduled`` event: the timer service queues it when its time comes. ``tags``
        (checked by the caller: :func:`genx_ray.model.check_tags`) index it; ``journal`` (step
        id -> entry) is what its journal starts with (a rerun's). ``also``: script calls that
        go in the same pipeline, once the run exists (a rerun's link from the run it reruns).
        ``priority``: 1 (most urgent) .. 5, where it waits in the run queue.
        ``fresh``: ``run_id`` was just made, so it cannot exist yet (one round trip).

        With a ``run_id`` that exists already, nothing is written and the existing run is
        returned: creating is idempotent, so a retried request cannot reset a run.
        """
        fresh = fresh or run_id is None  # a new id: it cannot exist yet
        now = time.time()
        run_id = run_id or new_run_id(now)  # its time is created_at's (time filters use ids)
        scheduled = start_at is not None and start_at > now
        status = RunStatus.SCHEDULED if scheduled else RunStatus.QUEUED
        fields = {
            "id": run_id, "workflow": workflow, "status": status.value,
            "input": json.dumps(input, separators=(",", ":")), "attempt": "1",
            "created_at": repr(now), "tenant": tenant, "priority": str(priority),
            **(extra or {}),
        }  # fmt: skip
        if tags:
            fields["tags"] = json.dumps(tags, separators=(",", ":"), ensure_ascii=False)
        if (parent := observer().run_context(run_id, workflow)) is not None:
            fields["traceparent"] = parent  # every attempt joins this trace
        first: BaseModel = RunQueuedEvent(run_id=run_id, workflow=workflow, ts=now)
        if scheduled:
            assert start_at is not None
            fields["start_at"] = repr(start_at)
            first = RunScheduledEvent(run_id=run_id, workflow=workflow, start_at=start_at, ts=now)
            enqueue = False  # the timer service does, when its time comes
        event = dump_event(first)
        create: lua.Call = (lua.CREATE, keys.run_keys(run_id),
                            [first.type, event, self.maxlen, len(journal or {}),  # type: ignore[attr-defined]
                             *_pairs(journal), *_pairs(fields)])  # fmt: skip
        # Index and queue live in other slots, so they are separate commands; the queue goes last
        # so a worker never sees a run that does not exist or is not indexed yet. One Redis runs
        # a pipeline in order: a fresh run goes in one round trip. A Redis Cluster runs each
        # node's part on its own: there, and for a run that may exist, the run comes first.
        one_trip = fresh and not is_cluster(self.redis)
        if not one_trip and not await lua.CREATE(self.redis, create[1], create[2]):
            return await self.get(run_id)
        # Its indexes (genx_ray.store._search): tenant, workflow, each tag, and open (it has
        # not ended); every index of the tenant is listed in INDEXES for the supervisor's trim.
        indexes = [keys.run_index(tenant), keys.run_index(tenant, workflow),
                   keys.status_index(tenant, keys.OPEN),
                   *(keys.tag_index(tenant, k, v) for k, v in (tags or {}).items())]  # fmt: skip
        async with self.redis.pipeline(transaction=False) as pipe:
            if one_trip:
                pipe.execute_command("EVALSHA", lua.CREATE.sha, 3, *create[1], *create[2])
            for index in indexes:
                pipe.zadd(index, {run_id: 0})
            listed = [*indexes, *keys.status_indexes(tenant)]
            pipe.zadd(keys.INDEXES, dict.fromkeys(listed, 0))
            if scheduled:
                pipe.zadd(keys.TIMERS, {run_id: start_at})
            for script, script_keys, args in also:
                pipe.execute_command("EVALSHA", script.sha, len(script_keys), *script_keys, *args)
            if enqueue:
                put_commands(pipe, run_id, 1, workflow, tenant, priority)
            results = await pipe.execute(raise_on_error=False)
        if one_trip and isinstance(results[0], Exception):
            if not isinstance(results[0], NoScriptError):
                raise results[0]
            # The script was not loaded (a new Redis, or one restarted): the index entries and
            # the queue entry went out before the run. Create it now (that loads the script) and
            # queue it again: a worker may have taken the first entry and, finding no run,
            # dropped it; if not, the second claim of the same attempt is refused.
            await lua.CREATE(self.redis, create[1], create[2])
            if enqueue:
                async with self.redis.pipeline(transaction=False) as again:
                    put_commands(again, run_id, 1, workflow, tenant, priority)
                    await again.execute()
        first_also = len(results) - len(also) - 2 * int(enqueue)
        for i, result in enumerate(results[1:], 1):
            if isinstance(result, NoScriptError) and first_also <= i < first_also + len(also):
                script, script_keys, args = also[i - first_also]
                await script(self.redis, script_keys, args)  # loads it, and runs it
            elif isinstance(result, Exception):
                raise result
        observer().run_created(workflow)
        return Run.from_hash(fields)

    async def create_idempotent(
        self,
        workflow: str,
        input: JsonValue,
        *,
        tenant: str,
        key: str,
        start_at: float | None = None,
        extra: dict[str, str] | None = None,
        quotas: Quotas | None = None,
        tags: dict[str, str] | None = None,
        priority: int = DEFAULT_PRIORITY,
    ) -> tuple[Run, bool]:
        """The run an ``Idempotency-Key`` made before (and True), or a new queued run under it.

        The same key with another input is :class:`IdempotencyConflict`: the key names one
        request, and a client reusing it for another is a bug to surface, not to paper over.
        A key never outlives its run: once the run it named has expired, the key names nothing,
        and the request starts a new run with a new id. With ``quotas``, a new run is admitted
        (:class:`QuotaExceeded`: nothing created) and counted; a replay is neither.
        """
        ikey = keys.idempotency(tenant, workflow, key)
        digest = canonical_hash(input)
        for _ in range(3):
            held = await self.redis.get(ikey)
            if held is not None:
                first = json.loads(held)
                if first["hash"] != digest:
                    raise IdempotencyConflict(
                        "this Idempotency-Key was used with a different input for this workflow"
                    )
                run_id = first["run"]
                # The first request may still be creating its run, or may have died before it
                # did: creating is idempotent, so this returns its run either way. A run that
                # is missing long after its id was made has expired: the key is spent.
                young = run_id >= new_run_id(time.time() - IDEMPOTENCY_GRACE_SECONDS)
                if young or await self.redis.exists(keys.run(run_id)):
                    return await self.create(
                        workflow, input, tenant=tenant, run_id=run_id, enqueue=True,
                        start_at=start_at, extra=extra, tags=tags, priority=priority,
                    ), True  # fmt: skip
            if quotas is not None:
                await quotas.admit(tenant)  # over quota: raises, nothing taken
            run_id = new_run_id()
            record = json.dumps({"run": run_id, "hash": digest})
            args = [held or "", record, IDEMPOTENCY_TTL]
            if await lua.TAKE_IDEMPOTENCY(self.redis, [ikey], args):
                run = await self.create(
                    workflow, input, tenant=tenant, run_id=run_id, enqueue=True,
                    start_at=start_at, extra=extra, tags=tags, priority=priority,
                )  # fmt: skip
                if quotas is not None:
                    await quotas.opened(tenant, run.id)
                return run, False
            if quotas is not None:  # another request took the key first: this one is its replay
                await quotas.refund(tenant)
        raise IdempotencyConflict("the Idempotency-Key is contended; retry")

    # -- reading -------------------------------------------------------------------------------

    async def get(self, run_id: str, *, tenant: str | None = None) -> Run:
        """The run; :class:`RunNotFound` if it does not exist or belongs to another tenant."""
        h = cast(dict[str, str], await self.redis.hgetall(keys.run(run_id)))
        if not h or (tenant is not None and h.get("tenant", DEFAULT_TENANT) != tenant):
            raise RunNotFound(run_id)
        return Run.from_hash(h)

    async def status(self, run_id: str) -> RunStatus:
        value = await self.redis.hget(keys.run(run_id), "status")
        if value is None:
            raise RunNotFound(run_id)
        return RunStatus(str(value))

    async def list(
        self,
        *,
        tenant: str = DEFAULT_TENANT,
        workflow: str | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
        cursor: str | None = None,
        max_scan: int = 20_000,
        tags: Sequence[tuple[str, str]] = (),
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> tuple[list[Run], str | None]:
        """Newest first, filtered (every filter from an index: :mod:`genx_ray.store._search`).
        Returns the page and the cursor of the next one (None at the end): ids sort by creation
        time, the cursor is the last id returned, or looked at when ``max_scan`` ids were looked
        at without filling the page (which then comes back short, with a cursor to go on
        from). Every run's tenant is checked again: the index decides nothing on its own."""
        if not 1 <= limit <= 500:
            raise UserError("limit must be between 1 and 500")
        found = RunFilter(workflow, status, tuple(tags), created_after, created_before)
        return await search(self.redis, tenant, found, limit=limit, cursor=cursor,
                            max_scan=max_scan)  # fmt: skip

    async def find(
        self,
        found: RunFilter,
        *,
        tenant: str = DEFAULT_TENANT,
        limit: int = 10_000,
        ids: Sequence[str] | None = None,
    ) -> builtins.list[Run]:
        """Every run of the tenant that fits ``found`` (among ``ids`` if given), newest first,
        at most ``limit``: what a bulk action acts on."""
        return await find_all(self.redis, tenant, found, limit=limit, ids=ids)

    async def counts(
        self, *, tenant: str = DEFAULT_TENANT, found: RunFilter | None = None, cap: int = 10_000
    ) -> tuple[dict[str, int], bool]:
        """How many of the tenant's runs (that fit ``found``, its status aside) are in each
        status, and whether that counts them all (False past ``cap``: the newest are counted)."""
        return await count(self.redis, tenant, found or RunFilter(), cap=cap)

    # -- what a run did, and doing it again ----------------------------------------------------

    async def steps(self, run_id: str, *, tenant: str | None = None) -> builtins.list[StepView]:
        """The run's steps in call order (:class:`RunNotFound` for another tenant's)."""
        await self.get(run_id, tenant=tenant)
        return (await read_history(self.redis, run_id))[0]

    async def history(self, run_id: str) -> tuple[builtins.list[StepView], dict[str, str]]:
        """The run's steps in call order, and its journal (step id -> entry, as stored)."""
        return await read_history(self.redis, run_id)

    async def journal(self, run_id: str) -> dict[str, str]:
        """The run's journal: step id -> entry, as stored."""
        return await read_journal(self.redis, run_id)

    async def rerun(
        self,
        original: Run,
        input: JsonValue,
        *,
        from_step: str | None,
        journal: dict[str, str],
        key: str | None = None,
        request_hash: str = "",
    ) -> tuple[Run, bool]:
        """A new run of ``original``'s workflow (its tags, ``rerun_of`` pointing back), whose
        journal starts with ``journal`` (:func:`genx_ray.model.rerun_entries`: what it reuses),
        queued; ``original`` lists it in its ``reruns`` and is otherwise untouched. Returns the
        run, and whether an earlier request with the same ``key`` (an ``Idempotency-Key``; the
        same ``request_hash`` or :class:`IdempotencyConflict`) made it already."""
        extra = {"rerun_of": original.id}
        if from_step:
            extra["rerun_from_step"] = from_step
        run_id, replayed = new_run_id(), False
        if key is not None:  # (without one, the id is new: created in one round trip)
            ikey = keys.rerun_idempotency(original.tenant, original.id, key)
            record = json.dumps({"run": run_id, "hash": request_hash})
            if not await self.redis.set(ikey, record, nx=True, ex=IDEMPOTENCY_TTL):
                held = json.loads(await self.redis.get(ikey) or record)
                if held["hash"] != request_hash:
                    raise IdempotencyConflict(
                        "this Idempotency-Key was used with a different request for this run"
                    )
                run_id, replayed = held["run"], True  # created, or being created: idempotent
        link: lua.Call = (lua.LINK_RERUN, [keys.run(original.id)], [run_id, MAX_RERUN_LINKS])
        run = await self.create(
            original.workflow, input, tenant=original.tenant, run_id=RunId(run_id), enqueue=True,
            extra=extra, tags=original.tags, journal=journal, also=[link], fresh=key is None,
            priority=original.priority,  # a rerun waits as its original did
        )  # fmt: skip
        return run, replayed

    async def cancel_requested(self, run_id: str) -> bool:
        return bool(await self.redis.hget(keys.run(run_id), "cancel_requested") == "1")

    # -- changing status -----------------------------------------------------------------------

    async def transition(
        self,
        run_id: str,
        target: RunStatus,
        *,
        allowed: frozenset[RunStatus] | set[RunStatus],
        event: BaseModel | None = None,
        fields: dict[str, str] | None = None,
        fence_attempt: int | None = None,
    ) -> str | None:
        """Move the run to ``target`` if its status is in ``allowed``; append ``event`` with it.

        Returns the event's id. Raises :class:`InvalidTransition` (status not allowed),
        :class:`Fenced` (``fence_attempt`` is no longer the run's attempt) or
        :class:`RunNotFound`.
        """
        args: list[Any] = [
            " ".join(s.value for s in allowed),
            target.value,
            "" if fence_attempt is None else str(fence_attempt),
            getattr(event, "type", "") if event is not None else "",
            dump_event(event) if event is not None else "",
            self.maxlen,
            self.retention_seconds if target.terminal else "",
            *_pairs(fields),  # strings as they are: JSON fields come encoded
        ]
        tenant = await self._will_end(run_id, target) if target.terminal else None
        try:
            entry_id = await lua.TRANSITION(self.redis, keys.expiring(run_id), args)
        except ResponseError as exc:
            raise self._error(exc, run_id, target, fence_attempt) from None
        if tenant is not None:
            await self._ended(run_id, tenant)
        return str(entry_id) or None

    async def _will_end(self, run_id: str, status: RunStatus, tenant: str | None = None) -> str:
        """Put a run into its tenant's index of ``status`` before that status is written, so
        the index never misses it (genx_ray.store._search); returns the tenant."""
        if tenant is None:
            tenant = str(await self.redis.hget(keys.run(run_id), "tenant") or DEFAULT_TENANT)
        await self.redis.zadd(keys.status_index(tenant, status.value), {run_id: 0})
        return tenant

    async def _ended(self, run_id: str, tenant: str) -> None:
        """A run that ended leaves its tenant's open index (readers would drop it anyway)."""
        await self.redis.zrem(keys.status_index(tenant, keys.OPEN), run_id)

    async def claim(
        self,
        run_id: str,
        attempt: int,
        event: RunStartedEvent,
        fields: dict[str, str],
        lease_seconds: float | None,
        *,
        watch: bool = True,
    ) -> Claimed:
        """Move a queued run to running for ``attempt``, with its ``run.started`` event, and take
        its lease (unless ``lease_seconds`` is None); returns the run and its journal (step id ->
        entry), all in one round trip. ``watch``: the supervisor watches the run from now on
        (a host that dies before its first renewal is found too). Raises
        :class:`InvalidTransition` (not queued), :class:`Fenced` or :class:`RunNotFound`."""
        (result,) = await self.claim_many(
            [Claim(run_id, attempt, event, fields)], lease_seconds, watch=watch
        )
        if isinstance(result, Exception):
            raise result
        return result

    async def claim_many(
        self, claims: Sequence[Claim], lease_seconds: float | None, *, watch: bool = True
    ) -> Sequence[Claimed | Exception]:
        """:meth:`claim` for many runs in one pipeline: each claim's run and journal, or why it
        was not this attempt's to run."""
        if not claims:  # every entry was a duplicate delivery
            return []
        lease_ms = "" if lease_seconds is None else int(lease_seconds * 1000)
        calls: builtins.list[lua.Call] = [
            (lua.CLAIM, [*keys.run_keys(c.run_id), keys.lease(c.run_id)],
             [c.attempt, dump_event(c.event), self.maxlen, lease_ms, *_pairs(c.fields)])
            for c in claims
        ]  # fmt: skip
        if watch:
            await self.redis.zadd(keys.LEASES, {c.run_id: time.time() for c in claims})
        results = await lua.execute_scripts(self.redis, calls)
        out: builtins.list[Claimed | Exception] = []
        unwatch = []
        for claim, result in zip(claims, results, strict=True):
            if isinstance(result, ResponseError):
                if " running" not in str(result):  # else another attempt holds the watch
                    unwatch.append(claim.run_id)
                out.append(self._error(result, claim.run_id, RunStatus.RUNNING, claim.attempt))
            elif isinstance(result, Exception):
                out.append(result)
            else:
                h, journal = result
                out.append((Run.from_hash(_as_dict(h)), _as_dict(journal)))
        if watch and unwatch:
            await self.redis.zrem(keys.LEASES, *unwatch)
        return out

    async def finish(
        self,
        run_id: str,
        attempt: int,
        status: RunStatus,
        event: BaseModel,
        fields: dict[str, str] | None = None,
    ) -> str | None:
        """End a running attempt with a terminal status and its event."""
        fields = {**(fields or {}), "finished_at": repr(time.time())}
        return await self.transition(
            run_id, status, allowed={RunStatus.RUNNING}, event=event, fields=fields,
            fence_attempt=attempt,
        )  # fmt: skip

    async def requeue(self, run_id: str, attempt: int, reason: str) -> int:
        """Hand a running attempt back to the queue as the next attempt (a drain); returns it."""
        nxt = attempt + 1
        await self.transition(
            run_id, RunStatus.QUEUED, allowed={RunStatus.RUNNING},
            fields={"attempt": str(nxt), "requeued_at": repr(time.time())},
            event=RunRestartedEvent(run_id=run_id, attempt=nxt, reason=reason),
            fence_attempt=attempt,
        )  # fmt: skip
        await self.enqueue(run_id, nxt)
        return nxt

    async def reap(
        self, run_id: str, attempt: int, *, max_attempts: int, reason: str, host_dead: bool
    ) -> str:
        """An attempt whose host is gone: requeued as the next attempt, or failed with
        ``RunHostLost`` past ``max_attempts`` (at once for a run started from a script). Unless
        ``host_dead`` (known, not inferred from a silent lease), a live lease protects the
        attempt. Returns 'requeued', 'failed', 'alive', 'raced' or 'gone'."""
        error = ErrorInfo(type="RunHostLost", message=reason)
        # A run this loss fails goes into the failed index first. Whether it may fail is read
        # now: 'lost' moves only by a reap of this attempt, and a reap that came first makes
        # this one a no-op (the attempt moved on), so what is read here is what REAP sees.
        tenant, lost, origin = await self.redis.hmget(keys.run(run_id), "tenant", "lost", "origin")
        tenant = str(tenant or DEFAULT_TENANT)
        if int(lost or 0) + 1 >= max_attempts or origin == "local":
            await self._will_end(run_id, RunStatus.FAILED, tenant)
        args: list[Any] = [
            attempt, max_attempts,
            dump_event(RunRestartedEvent(run_id=run_id, attempt=attempt + 1, reason=reason)),
            dump_event(RunFailedEvent(run_id=run_id, error=error)), error.model_dump_json(),
            repr(time.time()), self.maxlen, self.retention_seconds, "1" if host_dead else "",
        ]  # fmt: skip
        reaped = [*keys.run_keys(run_id), keys.lease(run_id), keys.children(run_id)]
        outcome = str(await lua.REAP(self.redis, reaped, args))
        if outcome == "requeued":
            await self.enqueue(run_id, attempt + 1)
        elif outcome == "failed":
            await self._ended(run_id, tenant)
            observer().run_ended(str(await self.redis.hget(keys.run(run_id), "workflow")), "failed")
        if outcome in ("requeued", "failed", "gone"):
            await self.redis.zrem(keys.LEASES, run_id)
        return outcome

    async def request_cancel(self, run_id: str, reason: str = "cancel requested") -> RunStatus:
        """Cancel a run no host holds (queued, scheduled, waiting) now, or flag a running one
        and signal its host (it stops within a second); its child runs are cancelled too.
        Returns the status after the call."""
        event = dump_event(RunCancelledEvent(run_id=run_id, reason=reason))
        args = [event, self.maxlen, repr(time.time()), self.retention_seconds]
        before, workflow, tenant, wait_kind = await self.redis.hmget(
            keys.run(run_id), "status", "workflow", "tenant", "wait_kind"
        )
        if before is not None and before not in TERMINAL:  # it may end now (or in its host,
            # which indexes it again): in the index before its status is written
            await self._will_end(run_id, RunStatus.CANCELLED, str(tenant or DEFAULT_TENANT))
        try:
            status = RunStatus(await lua.CANCEL(self.redis, keys.expiring(run_id), args))
        except ResponseError as exc:
            raise self._error(exc, run_id, RunStatus.CANCELLED, None) from None
        if status is RunStatus.CANCELLED and before in _CANCELLABLE:  # it ends here, no host
            await self._ended(run_id, str(tenant or DEFAULT_TENANT))
            if before == "waiting" and wait_kind == "batch":  # the timer service cancels its
                await self.redis.zadd(keys.TIMERS, {run_id: time.time()})  # batches now
            observer().run_ended(str(workflow), "cancelled")
        if status is RunStatus.RUNNING:
            await self.redis.xadd(
                keys.SIGNALS, {"run": run_id, "signal": "cancel"},
                maxlen=keys.SIGNALS_MAXLEN, approximate=True,
            )  # fmt: skip
        for child in await self.redis.smembers(keys.children(run_id)):
            with contextlib.suppress(RunNotFound):
                if not (await self.status(str(child))).terminal:
                    await self.request_cancel(str(child), "its parent run was cancelled")
        return status

    # -- waits ---------------------------------------------------------------------------------

    async def resume(self, run_id: str, step: str, entry: str, events: Sequence[BaseModel]) -> int:
        """Resume a run parked on ``step``: ``entry`` journaled as what the wait returns, the run
        queued again with ``events``. Returns the attempt queued, or 0 when the run was not
        waiting on that step (another resumed it first, or it was cancelled)."""
        args: list[Any] = [step, entry, repr(time.time()), self.maxlen, len(events)]
        for event in events:
            args += [getattr(event, "type", ""), dump_event(event)]
        attempt = int(await lua.RESUME(self.redis, keys.run_keys(run_id), args))
        if attempt:
            await self.enqueue(run_id, attempt)
        return attempt

    async def deliver_input(
        self, run_id: str, value: Any, *, input_id: str | None = None, tenant: str | None = None
    ) -> Run:
        """Give a run waiting in ``wait_for_input`` its input: checked against the schema it
        asked for (:class:`InputInvalid` naming the field), journaled with an
        ``input.received`` event, and the run resumed. :class:`NotWaitingForInput` when it does
        not wait for input (or for another ``input_id``); :class:`RunNotFound` for another
        tenant's run."""
        run = await self.get(run_id, tenant=tenant)
        wait = run.waiting
        if run.status is not RunStatus.WAITING or wait is None or wait.kind != "input":
            raise NotWaitingForInput(run_id, f"is {run.status.value}, not waiting for input")
        if input_id is not None and input_id != wait.input_id:
            raise NotWaitingForInput(run_id, f"waits for input {wait.input_id}, not {input_id}")
        check_input(value, wait.input_schema or {})
        wait_hash = await self.redis.hget(keys.run(run_id), "wait_hash") or ""
        entry = JournalEntry("wait_for_input", str(wait_hash), value=value).dumps()
        ref = StepRef(id=wait.step, name="wait_for_input")
        events = [
            InputReceivedEvent(run_id=run_id, input_id=wait.input_id or "", input=value, step=ref),
            RunResumedEvent(run_id=run_id, attempt=run.attempt, reason="input received"),
        ]  # fmt: skip
        if not await self.resume(run_id, wait.step, entry, events):
            raise NotWaitingForInput(run_id, "stopped waiting for input meanwhile")
        return await self.get(run_id)

    async def child_done(
        self, parent_id: str, step: str, entry: str, finished: BaseModel, resumed: BaseModel
    ) -> int:
        """Deliver a child run's outcome to its parent (once): journaled, and the parent resumed
        if it waits on it. Returns the attempt queued, 0 or -1 (see lua.CHILD_DONE)."""
        args = [
            step,
            entry,
            repr(time.time()),
            dump_event(finished),
            dump_event(resumed),
            self.maxlen,
        ]
        attempt = int(await lua.CHILD_DONE(self.redis, keys.run_keys(parent_id), args))
        if attempt > 0:
            await self.enqueue(parent_id, attempt)
        return attempt

    async def start_scheduled(self, run_id: str) -> bool:
        """Queue a scheduled run whose time came (once, whoever calls)."""
        workflow = await self.redis.hget(keys.run(run_id), "workflow")
        if workflow is None:
            return False
        event = dump_event(RunQueuedEvent(run_id=run_id, workflow=str(workflow)))
        args = [event, repr(time.time()), self.maxlen]
        if not await lua.START_SCHEDULED(self.redis, [keys.run(run_id), keys.events(run_id)], args):
            return False
        await self.enqueue(run_id, 1, str(workflow))
        return True

    async def queued_because(self, run_id: str, attempt: int | None, reason: str) -> bool:
        """Say in the run's events why its queued attempt still waits (a ``run.queued`` with
        ``reason``), once per attempt and reason; nothing once it left ``queued``."""
        if attempt is None:
            return False
        workflow = await self.redis.hget(keys.run(run_id), "workflow")
        if workflow is None:
            return False
        event = dump_event(RunQueuedEvent(run_id=run_id, workflow=str(workflow), attempt=attempt,
                                          reason=reason))  # fmt: skip
        args = [attempt, reason, event, self.maxlen]
        return bool(await lua.QUEUED_BECAUSE(self.redis, [keys.run(run_id), keys.events(run_id)],
                                             args))  # fmt: skip

    async def enqueue(self, run_id: str, attempt: int, workflow: str | None = None) -> None:
        """Put a queued run's attempt where it is taken from: the workers' queue, or, for a run
        of a script (``genx_ray.start``), the queue of the process that runs it, if it is
        still alive (else the run fails: workers may not have its code)."""
        queue, runner, tenant, priority, name = await self.redis.hmget(
            keys.run(run_id), "queue", "runner", "tenant", "priority", "workflow"
        )
        if runner and not await self.redis.exists(keys.runner(str(runner))):
            error = ErrorInfo(
                type="RunHostLost",
                message="the process that started it with genx_ray.start() is gone; a run "
                "started from a script is not run elsewhere",
            )  # fmt: skip
            with contextlib.suppress(InvalidTransition, RunNotFound):
                await self.transition(
                    run_id, RunStatus.FAILED, allowed={RunStatus.QUEUED},
                    event=RunFailedEvent(run_id=run_id, error=error),
                    fields={"error": error.model_dump_json(), "finished_at": repr(time.time())},
                )  # fmt: skip
                workflow = await self.redis.hget(keys.run(run_id), "workflow")
                observer().run_ended(str(workflow), "failed")
            return
        if queue:  # a script's own queue (a stream)
            fields = {"run": run_id, "attempt": str(attempt)}
            if workflow:
                fields["workflow"] = workflow
            await self.redis.xadd(str(queue), fields)
            return
        if name is None:
            return  # gone (expired): nothing to start
        async with self.redis.pipeline(transaction=False) as pipe:
            put_commands(
                pipe, run_id, attempt, workflow or str(name), str(tenant or DEFAULT_TENANT),
                int(priority or DEFAULT_PRIORITY),
            )  # fmt: skip
            await pipe.execute()

    @staticmethod
    def _error(
        exc: ResponseError, run_id: str, target: RunStatus, attempt: int | None
    ) -> Exception:
        kind, _, current = str(exc).partition(" ")
        if kind == "MISSING":
            return RunNotFound(run_id)
        if kind == "FENCED":
            return Fenced(run_id, attempt or 0)
        if kind == "INVALID":
            return InvalidTransition(run_id, current, target.value)
        return exc


def start_time(start_at: datetime | None, delay_seconds: float | None) -> float | None:
    """When a delayed run starts (unix seconds), from ``start_at`` (aware) or ``delay_seconds``;
    None to start now. :class:`InputInvalid` naming the field when they do not make sense."""
    if start_at is not None and delay_seconds is not None:
        raise InputInvalid.field("start_at", "give start_at or delay_seconds, not both")
    if delay_seconds is not None:
        if not 0 <= delay_seconds <= MAX_DELAY_SECONDS:
            raise InputInvalid.field("delay_seconds", f"must be from 0 to {MAX_DELAY_SECONDS}")
        return time.time() + delay_seconds if delay_seconds > 0 else None
    if start_at is None:
        return None
    if start_at.tzinfo is None:
        raise InputInvalid.field(
            "start_at", "must carry a time zone (RFC 3339, e.g. 2026-01-31T09:00:00Z)"
        )
    when = start_at.timestamp()
    if when > time.time() + MAX_DELAY_SECONDS:
        raise InputInvalid.field("start_at", "must be within a year from now")
    return when if when > time.time() else None


def _as_dict(flat: list[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


def check_input(value: Any, schema: dict[str, Any]) -> None:
    """:class:`InputInvalid`, naming the field, if ``value`` does not fit the JSON schema."""
    import jsonschema

    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(value)
    )
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "input"
        raise InputInvalid(
            f"input: {where}: {error.message}",
            errors=[{"loc": ["input", *error.absolute_path], "msg": error.message,
                     "type": str(error.validator)}],
        )  # fmt: skip
