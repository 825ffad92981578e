"""A run's event stream in Redis: append, read after an id, follow until the run ends.

Stream entry ids are the SSE event ids: ordered and unique, and ``XREAD`` from an id is exactly
"resume after". Appends are pipelined (many events, one round trip). A run host's appends go
through a Lua script that checks its attempt first (fencing), so a zombie from a superseded attempt
can write nothing.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio
from pydantic import BaseModel
from redis.exceptions import ResponseError

from genx_ray import keys
from genx_ray.errors import Fenced, RunNotFound, UserError
from genx_ray.events import Event, dumps, is_terminal, loads

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# Blocking reads stay short: redis-py (8.x) times out a blocking read of 5 s or more on its own,
# and a short block costs nothing because followers re-check the run's status between reads.
MAX_BLOCK_MS = 1000
_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")
START = "0-0"

# KEYS: run hash, events stream, journal hash.
# ARGV: attempt, maxlen, n_events, events..., then journal field/value pairs.
_FENCED_APPEND = """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if st[1] ~= 'running' or st[2] ~= ARGV[1] then
  return redis.error_reply('FENCED ' .. tostring(st[1]) .. ' ' .. tostring(st[2]))
end
local n = tonumber(ARGV[3])
for i = 4 + n, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
local ids = {}
for i = 4, 3 + n do
  ids[#ids + 1] = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[i])
end
return ids
"""


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """An event as stored: its stream entry id (the SSE id) and the event."""

    id: str
    event: Event


def check_event_id(value: str) -> str:
    """Validate a client-supplied event id (``Last-Event-ID``, ``?after=``)."""
    if not _ID.match(value):
        raise UserError(f"malformed event id {value!r}: expected <ms>-<seq> as sent in 'id:'")
    return value


def parse_entries(raw: Iterable[Any]) -> list[StreamEntry]:
    return [StreamEntry(entry_id, loads(fields["e"])) for entry_id, fields in raw]


class EventStore:
    def __init__(self, client: redis.asyncio.Redis, *, maxlen: int = 100_000) -> None:
        self.redis = client
        self.maxlen = maxlen
        self._fenced_append = client.register_script(_FENCED_APPEND)

    async def append(self, run_id: str, *events: BaseModel) -> list[str]:
        """Append events in order, in one round trip; returns their ids."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(
                    keys.events(run_id), {"e": dumps(event)}, maxlen=self.maxlen, approximate=True
                )
            return [str(i) for i in await pipe.execute()]

    async def append_fenced(
        self,
        run_id: str,
        attempt: int,
        events: Sequence[BaseModel],
        journal: Sequence[tuple[str, str]] = (),
    ) -> list[str]:
        """Append events (and journal entries) only while ``attempt`` is the run's live attempt."""
        args: list[str | int] = [attempt, self.maxlen, len(events)]
        args += [dumps(e) for e in events]
        for field, value in journal:
            args += [field, value]
        try:
            ids = await self._fenced_append(keys=keys.run_keys(run_id), args=args)
        except ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise Fenced(run_id, attempt) from None
            raise
        return [str(i) for i in ids]

    async def read(
        self, run_id: str, after: str = START, count: int | None = None
    ) -> list[StreamEntry]:
        """Events after ``after`` (exclusive), oldest first."""
        raw = await self.redis.xrange(keys.events(run_id), f"({after}", "+", count=count)
        return parse_entries(cast(list[Any], raw))

    async def follow(
        self, run_id: str, after: str = START, *, block_ms: int = 1000, batch: int = 500
    ) -> AsyncIterator[StreamEntry]:
        """Every event after ``after``, then live ones, until the terminal event.

        Between blocking reads it re-checks the run's status, so it can never hang on a run that
        ended or vanished: the terminal status and the terminal event are written in one script,
        so once the status is terminal the event is already readable.
        """
        stream, last = keys.events(run_id), after
        block_ms = min(block_ms, MAX_BLOCK_MS)
        while True:
            resp = cast(
                list[Any], await self.redis.xread({stream: last}, count=batch, block=block_ms)
            )
            if resp:
                for entry in parse_entries(resp[0][1]):
                    last = entry.id
                    yield entry
                    if is_terminal(entry.event):
                        return
                continue
            status = await self.redis.hget(keys.run(run_id), "status")
            if status is None:
                raise RunNotFound(run_id)
            if status in TERMINAL_STATUSES:
                for entry in await self.read(run_id, last):
                    yield entry
                return
