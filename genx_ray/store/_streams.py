"""A run's event stream in Redis: append, read after an id, follow until the run ends.

Stream entry ids are the SSE event ids: ordered and unique, and ``XREAD`` from an id is exactly
"resume after". Each entry keeps the event's type beside its JSON (:mod:`genx_ray.store._keys`), so a
reader that only passes events on (the gateway) never parses them. A run host's appends go
through :mod:`genx_ray.store._writer`, fenced by its attempt.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydantic import BaseModel
from redis.exceptions import ResponseError

from genx_ray.model import (
    TERMINAL,
    TERMINAL_TYPES,
    Event,
    Fenced,
    RunNotFound,
    UserError,
    dump_event,
    load_event,
)
from genx_ray.store import _keys as keys
from genx_ray.store import _scripts as lua

# Blocking reads stay short: redis-py (8.x) times out a blocking read of 5 s or more on its own,
# and a short block costs nothing because followers re-check the run's status between reads.
MAX_BLOCK_MS = 1000
# What Redis accepts as a stream id: <ms>-<seq>, each an unsigned 64-bit number.
_ID = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?")
_U64 = 2**64 - 1
START = "0-0"


class StreamEntry:
    """An event as stored: its stream entry id (the SSE id), its type, its JSON; ``event``
    parses the JSON on first use."""

    __slots__ = ("__dict__", "data", "id", "type")

    def __init__(self, entry_id: str, type: str, data: str) -> None:
        self.id, self.type, self.data = entry_id, type, data

    @functools.cached_property
    def event(self) -> Event:
        return load_event(self.data)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    @classmethod
    def of(cls, entry_id: str, event: BaseModel) -> StreamEntry:
        return cls(entry_id, event.type, dump_event(event))  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"StreamEntry({self.id!r}, {self.type!r})"


def check_event_id(value: str) -> str:
    """Validate a client-supplied event id (``Last-Event-ID``, ``?after=``): what Redis takes."""
    m = _ID.fullmatch(value)
    if not m or int(m.group(1)) > _U64 or int(m.group(2) or 0) > _U64:
        raise UserError(f"malformed event id {value!r}: expected <ms>-<seq> as sent in 'id:'")
    return value


@dataclass(frozen=True)
class ResumePoint:
    """Where a reader that saw up to some id goes on in a run's stream."""

    after: str  # read the events after this id
    first_available: str | None = None  # the stream was trimmed: events before this are gone
    trimmed: int = 0  # how many events were trimmed from the stream's start, in all
    at_end: bool = False  # the run has ended and the reader saw its last event: nothing to send


async def resume_point(redis: Any, run_id: str, after: str, *, ended: bool = False) -> ResumePoint:
    """Where to go on with a run's stream for a reader that saw up to ``after``.

    A reader that saw the last event of a run that has ``ended`` is ``at_end``: its stream ends
    at once, with nothing sent (a reconnecting ``EventSource`` sees no event twice). An ``after``
    past the stream's last id (an id from the future, or another run's) was never sent, so its
    reader gets what comes next as any other: the live events of a running run, the terminal
    event again of one that has ended.
    Where the stream was trimmed past ``after`` (``GENX_STREAM_MAXLEN``), ``first_available`` is
    the first id still stored: the events between the two are gone.
    """
    if after == START:
        return ResumePoint(after)
    try:
        info = await redis.xinfo_stream(keys.events(run_id))
    except ResponseError:  # no stream (yet)
        return ResumePoint(after)
    last = _str(info["last-generated-id"])
    if after == last:
        return ResumePoint(last, at_end=ended)
    if id_key(after) > id_key(last):  # never sent: the reader did not see the end either
        return ResumePoint(before(last) if ended else last)
    first = info.get("first-entry")
    first_id = _str(first[0]) if first else None
    trimmed = int(info.get("entries-added", info["length"])) - int(info["length"])
    if trimmed > 0 and first_id is not None and id_key(after) < id_key(first_id):
        return ResumePoint(after, first_id, trimmed)
    return ResumePoint(after)


def before(entry_id: str) -> str:
    """The stream id just before ``entry_id``."""
    ms, seq = id_key(entry_id)
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{_U64}"


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def follow_sync(
    redis: Any,
    run_id: str,
    after: str = START,
    *,
    follow: bool = True,
    block_ms: int = MAX_BLOCK_MS,
) -> Iterator[StreamEntry]:
    """A run's events after ``after`` from a blocking client, oldest first; with ``follow``,
    then live ones until its terminal event (a run that ended: its terminal event was written
    first, so nothing is missed). :class:`RunNotFound` if the run is gone meanwhile."""
    stream, last = keys.events(run_id), after
    while True:
        resp = cast(Any, redis.xread({stream: last}, count=500, block=block_ms if follow else None))
        if resp:
            for entry in parse_entries(resp[0][1]):
                last = entry.id
                yield entry
                if entry.terminal:
                    return
            continue
        if not follow:
            return
        status = redis.hget(keys.run(run_id), "status")
        if status is None:
            raise RunNotFound(run_id)
        if status in TERMINAL:
            return


def parse_entries(raw: Iterable[Any]) -> list[StreamEntry]:
    out = []
    for entry_id, fields in raw:
        data = fields[keys.EVENT_FIELD]
        kind = fields.get(keys.TYPE_FIELD) or json.loads(data)["type"]  # entries of older versions
        out.append(StreamEntry(entry_id, kind, data))
    return out


class EventStore:
    def __init__(self, client: Any, *, maxlen: int = 100_000) -> None:
        self.redis = client
        self.maxlen = maxlen

    async def append(self, run_id: str, *events: BaseModel) -> list[str]:
        """Append events in order, unfenced, in one round trip; returns their ids."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in events:
                fields = {keys.TYPE_FIELD: event.type, keys.EVENT_FIELD: dump_event(event)}  # type: ignore[attr-defined]
                pipe.xadd(keys.events(run_id), fields, maxlen=self.maxlen, approximate=True)
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
        for event in events:
            args += [event.type, dump_event(event)]  # type: ignore[attr-defined]
        for entry in journal:
            args += entry
        try:
            ids = await lua.APPEND(self.redis, keys.run_keys(run_id), args)
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
                    if entry.terminal:
                        return
                continue
            status = await self.redis.hget(keys.run(run_id), "status")
            if status is None:
                raise RunNotFound(run_id)
            if status in TERMINAL:
                for entry in await self.read(run_id, last):
                    yield entry
                return
