"""Group commit of a run's writes: events and journal entries, fenced by the run's attempt.

Everything a run host writes goes through one :class:`RunWriter`. ``emit`` queues an event and
returns at once (``publish`` is not awaitable); ``commit`` queues and waits until the batch holding
it is in Redis. Whatever is queued when the flusher wakes goes out in one Lua call, so a thousand
concurrent map items cost a handful of round trips, and order is the order of emission.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Sequence

from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from genx_ray.errors import Fenced
from genx_ray.streams import EventStore

log = logging.getLogger("genx_ray.writer")
_MAX_BATCH = 500
# A Redis restart must not fail the run: writes are retried this long before giving up.
_REDIS_OUTAGE_BUDGET = 30.0


class RunWriter:
    def __init__(self, events: EventStore, run_id: str, attempt: int) -> None:
        self.events = events
        self.run_id = run_id
        self.attempt = attempt
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._queue: list[tuple[BaseModel | None, tuple[str, str] | None]] = []
        # (items queued when the waiter came, future): ``upto`` only grows, so this stays sorted.
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._queued = 0  # total items ever queued; waiters wait for the flushed count to pass
        self._flushed = 0
        self._wake = asyncio.Event()
        self._error: BaseException | None = None
        self._task = asyncio.create_task(self._run(), name=f"genx-writer-{run_id}")

    @property
    def fenced(self) -> bool:
        return isinstance(self._error, Fenced)

    def emit(self, event: BaseModel) -> None:
        """Queue an event; callable from any thread (sync components run in threads)."""
        if threading.get_ident() == self._thread:
            self._push(event, None)
        else:
            self._loop.call_soon_threadsafe(self._push, event, None)

    async def commit(
        self, events: Sequence[BaseModel] = (), journal: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Queue events and journal entries; return once they (and all before them) are stored."""
        for entry in journal:
            self._push(None, entry)
        for event in events:
            self._push(event, None)
        await self.flush()

    async def flush(self) -> None:
        if self._error is not None:
            raise self._error
        if self._flushed >= self._queued:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append((self._queued, fut))
        await fut

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def _push(self, event: BaseModel | None, journal: tuple[str, str] | None) -> None:
        self._queue.append((event, journal))
        self._queued += 1
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
                try:
                    await self._write(batch)
                except Exception as exc:  # Fenced, or Redis gone for too long: fail every waiter
                    self._error = exc
                    for _, fut in self._waiters:
                        if not fut.done():
                            fut.set_exception(exc)
                    self._waiters.clear()
                    return
                self._flushed += len(batch)
                while self._waiters and self._waiters[0][0] <= self._flushed:
                    fut = self._waiters.popleft()[1]
                    if not fut.done():
                        fut.set_result(None)

    async def _write(self, batch: list[tuple[BaseModel | None, tuple[str, str] | None]]) -> None:
        events = [e for e, _ in batch if e is not None]
        journal = [j for _, j in batch if j is not None]
        deadline = self._loop.time() + _REDIS_OUTAGE_BUDGET
        delay = 0.05
        while True:
            try:
                await self.events.append_fenced(self.run_id, self.attempt, events, journal)
                return
            except (RedisConnectionError, RedisTimeoutError, OSError):
                if self._loop.time() > deadline:
                    raise
                log.warning(
                    "run %s: Redis unreachable; retrying writes in %.2fs", self.run_id, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
