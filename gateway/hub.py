"""One reader per gateway process for every live event stream it serves.

A client first replays what is stored (``XRANGE`` pages, no connection held), then joins the hub:
a single task that ``XREAD``s all followed streams at once and hands each subscriber the entries
after its own last id. Many concurrent clients cost one blocking Redis connection, no thread each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio

from genx_ray import keys
from genx_ray.events import is_terminal
from genx_ray.streams import TERMINAL_STATUSES, EventStore, StreamEntry, parse_entries

log = logging.getLogger("gateway.hub")
_PAGE = 1000


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class _Subscriber:
    run_id: str
    last: str
    queue: asyncio.Queue[StreamEntry] = field(default_factory=asyncio.Queue)


class EventHub:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        block_ms: int = 100,
        recheck_seconds: float = 5.0,
    ) -> None:
        self.redis = client
        self.events = EventStore(client)
        # Bounds how long a client that joined while the reader was blocked waits for its first
        # live event; reads return at once when any followed stream has data.
        self.block_ms = block_ms
        # A quiet stream's run status is re-checked this often, so no stream can hang open.
        self.recheck_seconds = recheck_seconds
        self._subs: dict[str, set[_Subscriber]] = {}
        self._has_subs = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def followers(self) -> int:
        return sum(len(s) for s in self._subs.values())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._read_forever(), name="gateway-event-hub")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def stream(self, run_id: str, after: str) -> AsyncIterator[StreamEntry]:
        """Every event after ``after``, then live ones, ending after the terminal event."""
        last = after
        while True:  # replay what is stored
            page = await self.events.read(run_id, last, count=_PAGE)
            for entry in page:
                last = entry.id
                yield entry
                if is_terminal(entry.event):
                    return
            if len(page) < _PAGE:
                break
        sub = _Subscriber(run_id, last)
        self._subs.setdefault(run_id, set()).add(sub)
        self._has_subs.set()
        try:
            while True:
                try:
                    entry = await asyncio.wait_for(sub.queue.get(), self.recheck_seconds)
                except TimeoutError:
                    status = await self.redis.hget(keys.run(run_id), "status")
                    if status is None or status in TERMINAL_STATUSES:
                        for entry in await self.events.read(run_id, sub.last):
                            yield entry
                        return
                    continue
                yield entry
                if is_terminal(entry.event):
                    return
        finally:
            subs = self._subs.get(run_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[run_id]

    async def _read_forever(self) -> None:
        while True:
            if not self._subs:
                self._has_subs.clear()
                await self._has_subs.wait()
            streams: dict[Any, Any] = {
                keys.events(run_id): min((s.last for s in subs), key=_key)
                for run_id, subs in self._subs.items()
            }
            try:
                resp = cast(
                    list[Any], await self.redis.xread(streams, count=_PAGE, block=self.block_ms)
                )
            except (OSError, redis.RedisError) as exc:
                log.warning("event hub: XREAD failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            for stream, raw in resp or ():
                run_id = str(stream).split("{", 1)[1].split("}", 1)[0]
                entries = parse_entries(raw)
                for sub in list(self._subs.get(run_id, ())):
                    for entry in entries:
                        if _key(entry.id) > _key(sub.last):
                            sub.last = entry.id
                            sub.queue.put_nowait(entry)
