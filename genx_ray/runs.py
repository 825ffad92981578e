"""Run records in Redis: create, get, list (newest first, filtered, cursor-paginated) and atomic
status transitions.

Statuses move ``queued -> running -> succeeded | failed | cancelled`` (a restart moves ``running``
back to ``queued`` with ``attempt + 1``); nothing leaves a terminal status. A transition and its
event are written by one Lua script: the terminal status is never visible without its event, and
readers that see a terminal status know the stream is complete.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

import redis.asyncio
from pydantic import BaseModel, JsonValue
from redis.exceptions import ResponseError

from genx_ray import keys
from genx_ray.errors import Fenced, InvalidTransition, RunNotFound, UserError
from genx_ray.events import ErrorInfo, RunQueued, dumps
from genx_ray.ids import RunId, new_run_id

DEFAULT_TENANT = "default"


class RunStatus(StrEnum):
    QUEUED = "queued"  # accepted, waiting for a worker (or for a restart)
    RUNNING = "running"  # a run host is executing it
    SUCCEEDED = "succeeded"  # finished; ``output`` is set
    FAILED = "failed"  # an uncaught error or too many restarts; ``error`` says why
    CANCELLED = "cancelled"  # stopped on request

    @property
    def terminal(self) -> bool:
        return self in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


TERMINAL = frozenset(s for s in RunStatus if s.terminal)


class Run(BaseModel):
    """A run as the API shows it."""

    id: str
    workflow: str
    status: RunStatus
    input: JsonValue = None
    output: JsonValue = None
    error: ErrorInfo | None = None
    attempt: int = 1
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    tenant: str = DEFAULT_TENANT
    cancel_requested: bool = False
    # LLM usage of the run (genx_ray.llm): calls, prompt_tokens, completion_tokens, retries,
    # cost_usd (an estimate from public prices); None before any call.
    usage: dict[str, float] | None = None

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Run:
        def ts(name: str) -> datetime | None:
            return datetime.fromtimestamp(float(h[name]), UTC) if h.get(name) else None

        return cls(
            id=h["id"],
            workflow=h["workflow"],
            status=RunStatus(h["status"]),
            input=json.loads(h.get("input") or "null"),
            output=json.loads(h["output"]) if "output" in h else None,
            error=ErrorInfo.model_validate_json(h["error"]) if h.get("error") else None,
            attempt=int(h.get("attempt", "1")),
            created_at=ts("created_at") or datetime.now(UTC),
            started_at=ts("started_at"),
            finished_at=ts("finished_at"),
            tenant=h.get("tenant", DEFAULT_TENANT),
            cancel_requested=h.get("cancel_requested") == "1",
            usage=_usage(h),
        )


def _usage(h: dict[str, str]) -> dict[str, float] | None:
    if "usage_calls" not in h:
        return None
    usage: dict[str, float] = {
        name: int(h.get(f"usage_{name}", "0"))
        for name in ("calls", "prompt_tokens", "completion_tokens", "retries")
    }
    usage["cost_usd"] = int(h.get("usage_cost_nanos", "0")) / 1e9
    return usage


# KEYS: run hash, events stream, journal hash.
# ARGV: allowed current statuses (space separated), target status, attempt to fence on ('' = any),
#       event JSON ('' = none), stream maxlen, seconds to expire the run's keys in ('' = keep),
#       then field/value pairs to set.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return redis.error_reply('MISSING') end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[3] then
  return redis.error_reply('FENCED ' .. cur)
end
if not string.find(' ' .. ARGV[1] .. ' ', ' ' .. cur .. ' ', 1, true) then
  return redis.error_reply('INVALID ' .. cur)
end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local id = ''
if ARGV[4] ~= '' then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[4])
end
if ARGV[6] ~= '' then
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
end
return id
"""

# KEYS: run hash, events stream. ARGV: run.queued event JSON, maxlen, then field/value pairs.
# Creates the run only if it does not exist yet (a retried create must never reset a run).
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[1])
return 1
"""

# KEYS: run hash, events stream. ARGV: event JSON for a queued run, maxlen, now.
# Queued: cancelled at once. Running: flagged; the run host stops at its next step boundary.
_CANCEL = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return redis.error_reply('MISSING') end
if cur == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[3],
             'cancel_requested', '1')
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[1])
  return 'cancelled'
end
if cur == 'running' then redis.call('HSET', KEYS[1], 'cancel_requested', '1') end
return cur
"""


class RunStore:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        maxlen: int = 100_000,
        retention_seconds: int = 7 * 24 * 3600,
    ) -> None:
        self.redis = client
        self.maxlen = maxlen
        self.retention_seconds = retention_seconds
        self._transition = client.register_script(_TRANSITION)
        self._cancel = client.register_script(_CANCEL)
        self._create = client.register_script(_CREATE)

    async def create(
        self,
        workflow: str,
        input: JsonValue,
        *,
        tenant: str = DEFAULT_TENANT,
        run_id: RunId | None = None,
        enqueue: bool = False,
        extra: dict[str, str] | None = None,
    ) -> Run:
        """Write a queued run and its ``run.queued`` event; put it on the run queue if asked.

        With a ``run_id`` that exists already, nothing is written and the existing run is
        returned: creating is idempotent, so a retried request cannot reset a run.
        """
        run_id = run_id or new_run_id()
        now = time.time()
        fields = {
            "id": run_id, "workflow": workflow, "status": RunStatus.QUEUED.value,
            "input": json.dumps(input, separators=(",", ":")), "attempt": "1",
            "created_at": repr(now), "tenant": tenant, **(extra or {}),
        }  # fmt: skip
        event = dumps(RunQueued(run_id=run_id, workflow=workflow, ts=now))
        args: list[str | int] = [event, self.maxlen]
        for name, value in fields.items():
            args += [name, value]
        if not await self._create(keys=[keys.run(run_id), keys.events(run_id)], args=args):
            return await self.get(run_id)
        # Index and queue live in other slots, so they are separate writes; the queue goes last so
        # a worker never sees a run that is not indexed yet.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.run_index(tenant), {run_id: 0})
            pipe.zadd(keys.run_index(tenant, workflow), {run_id: 0})
            if enqueue:
                pipe.xadd(keys.QUEUE, {"run": run_id})
            await pipe.execute()
        return Run.from_hash(fields)

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
        max_scan: int = 2000,
    ) -> tuple[list[Run], str | None]:
        """Newest first. Returns the page and the cursor of the next one (None at the end).

        Ids sort by creation time, so the index is a lexicographic sorted set and the cursor is
        the last id returned. A status filter scans at most ``max_scan`` ids per call; a page can
        then come back short but with a cursor to go on from.
        """
        if not 1 <= limit <= 500:
            raise UserError("limit must be between 1 and 500")
        index = keys.run_index(tenant, workflow)
        upper = f"({cursor}" if cursor else "+"
        page: list[Run] = []
        scanned, last = 0, cast(str | None, None)
        while scanned < max_scan:
            ids = cast(
                list[str], await self.redis.zrevrangebylex(index, upper, "-", start=0, num=limit)
            )
            if not ids:
                return page, None
            async with self.redis.pipeline(transaction=False) as pipe:
                for run_id in ids:
                    pipe.hgetall(keys.run(run_id))
                hashes = await pipe.execute()
            gone = []
            for run_id, h in zip(ids, hashes, strict=True):
                scanned, last = scanned + 1, run_id
                if not h:
                    gone.append(run_id)  # expired after its retention period
                elif status is None or h["status"] == status.value:
                    page.append(Run.from_hash(h))
                    if len(page) == limit:
                        break
            if gone:
                await self.redis.zrem(index, *gone)
            if len(page) == limit:
                break
            upper = f"({last}"
        return page, last

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
            dumps(event) if event is not None else "",
            self.maxlen,
            self.retention_seconds if target.terminal else "",
        ]
        for name, value in (fields or {}).items():
            args += [name, value]  # strings as they are: JSON fields come encoded
        try:
            entry_id = await self._transition(keys=keys.run_keys(run_id), args=args)
        except ResponseError as exc:
            kind, _, current = str(exc).partition(" ")
            if kind == "MISSING":
                raise RunNotFound(run_id) from None
            if kind == "FENCED":
                raise Fenced(run_id, fence_attempt or 0) from None
            if kind == "INVALID":
                raise InvalidTransition(run_id, current, target.value) from None
            raise
        return str(entry_id) or None

    async def request_cancel(self, run_id: str, event_json: str) -> RunStatus:
        """Cancel a queued run now, or flag a running one. Returns the status after the call."""
        try:
            status = await self._cancel(
                keys=[keys.run(run_id), keys.events(run_id)],
                args=[event_json, self.maxlen, repr(time.time())],
            )
        except ResponseError as exc:
            if str(exc) == "MISSING":
                raise RunNotFound(run_id) from None
            raise
        if status == RunStatus.CANCELLED.value:
            await self.redis.expire(keys.run(run_id), self.retention_seconds)
            await self.redis.expire(keys.events(run_id), self.retention_seconds)
        return RunStatus(status)

    async def cancel_requested(self, run_id: str) -> bool:
        return await self.redis.hget(keys.run(run_id), "cancel_requested") == "1"
