"""Group commit of runs' writes: events and journal entries, fenced by each run's attempt.

Everything a run writes goes through its :class:`RunWriter`; every run writer of a process (a
run host executing hundreds of runs, a map actor serving many maps) shares one
:class:`BatchWriter`, whose single flusher sends whatever is queued, for every run, in one
pipeline: one fenced script call per run (:data:`genx_ray.store._scripts.APPEND`). A thousand
concurrent map items, or a thousand runs each finishing a step, cost a handful of round trips.
Within a run, order is the order of emission. Each event is masked of secrets as it is made
(:func:`genx_ray.model.dump_event`).

``emit`` queues an event and returns at once (``publish`` is not awaitable); ``commit`` queues
and waits until the batch holding it is stored; ``queue`` queues without waiting; ``finish``
ends the attempt (terminal status, event, lease released) after everything queued before it,
in the same pipeline; the runs of a batch that end are added to their tenant's status index
first (a command of its own: the index lives in another slot) and leave its open index after.
A superseded attempt's write fails with :class:`~genx_ray.model.Fenced` for that run
only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from genx_ray.model import Fenced, InvalidTransition, RunNotFound, dump_event
from genx_ray.observe import OutageLog
from genx_ray.store import _keys as keys
from genx_ray.store import _scripts as lua

log = logging.getLogger("genx_ray.writer")
_MAX_BATCH = 500  # items per run per round trip
# A Redis restart must not fail the run: writes are retried this long before giving up.
REDIS_OUTAGE_BUDGET = 30.0


@dataclass
class End:
    """The end of an attempt (lua.FINISH: a terminal status; lua.PARK: parked), queued after
    its last events and written in the same pipeline."""

    script: lua.Script
    args: list[Any]  # after the attempt, which goes first
    done: asyncio.Future[Any]  # the script's reply, or the error (Fenced...)
    # A terminal status: its tenant's status index, where the run goes before the status is
    # written (so the index never misses it), and the open index it leaves once it is.
    index: str | None = None
    open_index: str | None = None


Item = tuple[BaseModel | None, tuple[str, str] | None] | End


class RunWriter:
    """One attempt's writes. Made by :meth:`BatchWriter.writer`."""

    def __init__(
        self, batch: BatchWriter, run_id: str, attempt: int, tenant: str | None = None
    ) -> None:
        self.batch = batch
        self.run_id = run_id
        self.attempt = attempt
        self.tenant = tenant  # the run's: its status indexes (None: a writer that never ends it)
        self._queue: deque[Item] = deque()
        # (items queued when the waiter came, future): ``upto`` only grows, so this stays sorted.
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._queued = 0  # total items ever queued; waiters wait for the flushed count to pass
        self._flushed = 0
        self.error: BaseException | None = None
        self.leased = False

    @property
    def fenced(self) -> bool:
        return isinstance(self.error, Fenced)

    def emit(self, event: BaseModel) -> None:
        """Queue an event; callable from any thread (sync components run in threads)."""
        if threading.get_ident() == self.batch.thread:
            self._push(event, None)
        else:
            self.batch.loop.call_soon_threadsafe(self._push, event, None)

    def queue(
        self, events: Iterable[BaseModel] = (), journal: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Queue journal entries and events (in that order); stored with the next batch."""
        for entry in journal:
            self._push(None, entry)
        for event in events:
            self._push(event, None)

    async def commit(
        self, events: Iterable[BaseModel] = (), journal: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Queue events and journal entries; return once they (and all before them) are stored."""
        self.queue(events, journal)
        await self.flush()

    async def flush(self) -> None:
        """Wait until everything queued so far is stored (or raise why it cannot be)."""
        if self.error is not None:
            raise self.error
        if self._flushed >= self._queued:
            return
        fut: asyncio.Future[None] = self.batch.loop.create_future()
        self._waiters.append((self._queued, fut))
        await fut

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()

    async def finish(
        self, status: str, event: BaseModel, fields: dict[str, str], *, leased: bool
    ) -> str:
        """End the attempt after what is queued: status, terminal event and ``fields`` in one
        fenced script that also releases its lease (``leased``). Returns the event's id; raises
        :class:`Fenced` (superseded), :class:`InvalidTransition` or :class:`RunNotFound`."""
        args = [status, _type(event), dump_event(event), self.batch.maxlen, self.batch.retention,
                *[x for kv in fields.items() for x in kv]]  # fmt: skip
        indexes: tuple[str | None, str | None] = (None, None)
        if self.tenant is not None:
            indexes = (keys.status_index(self.tenant, status),
                       keys.status_index(self.tenant, keys.OPEN))  # fmt: skip
        return str(await self._end(lua.FINISH, args, leased=leased, indexes=indexes))

    async def park(
        self,
        step: str,
        events: list[BaseModel],
        fields: dict[str, str],
        *,
        ready_if_journaled: bool,
        leased: bool,
    ) -> str:
        """Park the run after what is queued (lua.PARK): ``waiting`` on ``step``, with
        ``events`` and the wait's ``fields``. Returns 'parked', or 'ready' when
        ``ready_if_journaled`` and the step's outcome is in the journal already."""
        args: list[Any] = [step, "1" if ready_if_journaled else "", self.batch.maxlen, len(events)]
        for event in events:
            args += [_type(event), dump_event(event)]
        args += [x for kv in fields.items() for x in kv]
        return str(await self._end(lua.PARK, args, leased=leased))

    async def _end(
        self,
        script: lua.Script,
        args: list[Any],
        *,
        leased: bool,
        indexes: tuple[str | None, str | None] = (None, None),
    ) -> Any:
        if self.error is not None:
            raise self.error
        done: asyncio.Future[Any] = self.batch.loop.create_future()
        self.leased = leased
        self._queue.append(End(script, args, done, *indexes))
        self._queued += 1
        self.batch.dirty(self)
        return await done

    def _push(self, event: BaseModel | None, journal: tuple[str, str] | None) -> None:
        if self.error is not None:
            return  # fenced or failed: nothing more of this attempt reaches Redis
        self._queue.append((event, journal))
        self._queued += 1
        self.batch.dirty(self)

    def _take(self) -> list[Item]:
        """The next items to write: up to _MAX_BATCH, and never past a Finish."""
        out: list[Item] = []
        while self._queue and len(out) < _MAX_BATCH:
            item = self._queue.popleft()
            out.append(item)
            if isinstance(item, End):
                break
        return out

    def _stored(self, n: int) -> None:
        self._flushed += n
        while self._waiters and self._waiters[0][0] <= self._flushed:
            fut = self._waiters.popleft()[1]
            if not fut.done():
                fut.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        for item in self._queue:
            if isinstance(item, End) and not item.done.done():
                item.done.set_exception(exc)
        self._queue.clear()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._waiters.clear()


class BatchWriter:
    """The flusher shared by every run writer of one event loop."""

    def __init__(
        self, client: Any, *, maxlen: int = 100_000, retention: int = 7 * 24 * 3600
    ) -> None:
        self.redis = client
        self.maxlen = maxlen
        self.retention = retention  # how long a run's keys stay once it ended
        self.outage = OutageLog("run writes", log)
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self._dirty: dict[RunWriter, None] = {}  # an ordered set
        self._writing: list[RunWriter] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def writer(self, run_id: str, attempt: int, *, tenant: str | None = None) -> RunWriter:
        return RunWriter(self, run_id, attempt, tenant)

    def dirty(self, writer: RunWriter) -> None:
        self._dirty[writer] = None
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._run(), name="genx-batch-writer")

    async def close(self) -> None:
        """Store what is queued, then stop the flusher."""
        busy = [*self._dirty, *self._writing]
        await asyncio.gather(*(w.flush() for w in busy), return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                writers = self._writing = list(self._dirty)
                self._dirty.clear()
                batches = [(w, w._take()) for w in writers]
                await self._write(batches)
                self._writing = []
                for w in writers:
                    if w._queue and w.error is None:
                        self._dirty[w] = None

    async def _write(self, batches: list[tuple[RunWriter, list[Item]]]) -> None:
        calls: list[lua.Call] = []
        plan: list[tuple[RunWriter, int, int, End | None]] = []  # writer, calls, items, end
        for w, items in batches:
            end = items[-1] if items and isinstance(items[-1], End) else None
            run_keys = list(keys.run_keys(w.run_id))
            n = 0
            if end is None or len(items) > 1:
                calls.append((lua.APPEND, run_keys, self._append_args(w, items)))
                n += 1
            if end is not None:
                lease = keys.lease(w.run_id)
                children = keys.children(w.run_id)  # FINISH: it expires with the run
                calls.append((end.script, [*run_keys, lease, children], [w.attempt, *end.args]))
                n += 1
            plan.append((w, n, len(items), end))
        indexed = [(end.index, w.run_id) for w, _, _, end in plan if end and end.index]
        if indexed and not await self._index(indexed, batches):
            results = None  # Redis stayed away: nothing of the batch was written
        else:
            results = await self._execute(calls, batches)
        if results is None:  # every writer failed; their ends with them
            for w, _, _, end in plan:
                if end is not None and not end.done.done() and w.error is not None:
                    end.done.set_exception(w.error)
            return
        at = 0
        ended = []
        closed: dict[str, list[str]] = {}  # open index -> runs that ended
        for w, n, count, end in plan:
            outcome = results[at : at + n]
            at += n
            error = next((r for r in outcome if isinstance(r, Exception)), None)
            if error is not None:
                w._fail(_as_error(error, w))
                if end is not None and not end.done.done():
                    end.done.set_exception(w.error or error)
                continue
            w._stored(count)
            if end is not None:
                if w.leased and outcome[-1] != "ready":  # 'ready': a park that did not happen
                    ended.append(w.run_id)
                if end.open_index is not None:
                    closed.setdefault(end.open_index, []).append(w.run_id)
                if not end.done.done():
                    end.done.set_result(outcome[-1])
        if ended or closed:  # the supervisor stops watching them; they leave the open indexes
            with contextlib.suppress(Exception):  # (other slots: commands of their own)
                async with self.redis.pipeline(transaction=False) as pipe:
                    if ended:
                        pipe.zrem(keys.LEASES, *ended)
                    for index, run_ids in closed.items():
                        pipe.zrem(index, *run_ids)
                    await pipe.execute()

    async def _index(
        self, indexed: list[tuple[str, str]], batches: list[tuple[RunWriter, list[Item]]]
    ) -> bool:
        """Add runs about to end to their status indexes, before their status is written (then
        an index never misses a run that has the status). False when Redis stayed unreachable
        past the outage budget (every writer of the batch has failed then)."""
        deadline = self.loop.time() + REDIS_OUTAGE_BUDGET
        delay = 0.05
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for index, run_id in indexed:
                        pipe.zadd(index, {run_id: 0})
                    await pipe.execute()
                return True
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if self.loop.time() > deadline:
                    for w, _ in batches:
                        w._fail(exc)
                    return False
                self.outage.failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _append_args(self, w: RunWriter, items: list[Item]) -> list[Any]:
        events: list[BaseModel] = []
        journal: list[str] = []
        for item in items:
            if isinstance(item, End):
                continue
            event, entry = item
            if event is not None:
                events.append(event)
            if entry is not None:
                journal += entry
        args: list[Any] = [w.attempt, self.maxlen, len(events)]
        for event in events:
            args += [_type(event), dump_event(event)]
        return args + journal

    async def _execute(
        self, calls: list[lua.Call], batches: list[tuple[RunWriter, list[Item]]]
    ) -> list[Any] | None:
        """The calls' results; None when Redis stayed unreachable past the outage budget (then
        every writer of the batch has failed)."""
        deadline = self.loop.time() + REDIS_OUTAGE_BUDGET
        delay = 0.05
        while True:
            try:
                results = await lua.execute_scripts(self.redis, calls)
                self.outage.ok()
                return results
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if self.loop.time() > deadline:
                    for w, _ in batches:
                        w._fail(exc)
                    return None
                self.outage.failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


def _type(event: BaseModel) -> str:
    return str(getattr(event, "type", ""))


def _as_error(result: Exception, w: RunWriter) -> Exception:
    """A script's error reply as the error it means for the writer's run."""
    text = str(result)
    if isinstance(result, ResponseError) and text.startswith("FENCED"):
        return Fenced(w.run_id, w.attempt)
    if isinstance(result, ResponseError) and text.startswith("INVALID"):
        return InvalidTransition(w.run_id, text.partition(" ")[2], "a terminal status")
    if isinstance(result, ResponseError) and text.startswith("MISSING"):
        return RunNotFound(w.run_id)
    return result
