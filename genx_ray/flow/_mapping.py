"""``Component.map``: one component over many items, bounded, in input order, errors in place.

Three ways to run the items, one per function here:

- :func:`map_direct`: outside any run, the items are plain calls (retry, timeout) on the caller's
  loop;
- :func:`map_in_run`: in a run, each item is a quiet step on the run's own loop: journaled
  (a restarted run does not redo it), no events of its own, an error in its place;
- the :class:`Placement` (:mod:`genx_ray.compute`): a placed component's items go in chunks to the
  map actors of the Ray cluster; the run host journals them as they come.

In a run the map is itself a step (``<name>.map``) with ``step.started`` / ``step.completed``
events, and coalesced ``progress`` events of kind ``map`` (:class:`~genx_ray.model.MapProgress`,
a few per second at most, whatever the batch size).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

from genx_ray.flow._batching import map_batched
from genx_ray.flow._context import RunContext, current_run, current_scope, step_scope
from genx_ray.flow._placement import Settle, placement
from genx_ray.flow._steps import StepSpec, call_direct, call_step, item_error
from genx_ray.model import (
    MapProgress,
    ProgressEvent,
    Settings,
    StepCompletedEvent,
    StepError,
    StepRef,
    StepStartedEvent,
    Unplaceable,
    UserError,
    canonical_hash,
    item_step_id,
)
from genx_ray.observe import Observation

log = logging.getLogger("genx_ray.mapping")
PROGRESS_EVERY = 0.5  # seconds between coalesced map progress events
DEFAULT_MAP_CONCURRENCY = 16
SPREAD_MIN_ITEMS = 100  # an unplaced map this large goes to the map actors (on a Ray cluster)


def default_map_concurrency() -> int:
    """What ``map`` keeps in flight when not told: enough for the largest LLM budget."""
    caps = [limit.concurrency for limit in Settings.current().llm_limits.values()]
    return max((cap for cap in caps if cap), default=DEFAULT_MAP_CONCURRENCY)


async def map_component(
    spec: StepSpec,
    items: Iterable[Any],
    *,
    concurrency: int | None,
    fail_fast: bool,
    spread: bool | None = None,
    llm: str = "online",
    completion_window: str = "24h",
) -> list[Any]:
    """``Component.map``: see its docstring."""
    if llm not in ("online", "batch"):
        raise UserError(f"map llm must be 'online' or 'batch', not {llm!r}")
    if concurrency is None:
        concurrency = default_map_concurrency()
    if concurrency < 1:
        raise UserError("map concurrency must be at least 1")
    todo = list(items)
    scope = current_scope()
    ctx = current_run() if scope is not None else None  # a run, and a place in it
    map_name = f"{spec.name}.map"
    map_id = scope.next_step_id(map_name) if scope is not None else map_name
    if llm == "batch" and ctx is None:
        raise UserError(
            'map(llm="batch") works inside a workflow run: its run waits for the provider\'s '
            "batch holding no host (outside a run, map with llm='online')"
        )
    if llm == "batch" and (spec.placed or spread):
        raise UserError(
            f'{spec.name}.map(llm="batch"): its items run on the run\'s own loop (they mostly '
            "wait for the batch); a placed component or spread=True cannot map in batch mode"
        )
    if ctx is None:
        return await map_direct(
            spec, todo, map_id, concurrency=concurrency, fail_fast=fail_fast, spread=spread
        )
    with ctx.observer.map(spec.name, map_id, len(todo), concurrency) as observed:
        try:
            if llm == "batch":
                return await _map_step(
                    spec, ctx, map_id, todo, concurrency, fail_fast, False, observed,
                    completion_window,
                )  # fmt: skip
            return await _map_step(
                spec, ctx, map_id, todo, concurrency, fail_fast, spread, observed
            )
        except Exception as exc:  # fail_fast: the first failed item's error
            observed.failed(exc)
            raise


async def _map_step(
    spec: StepSpec, ctx: RunContext, map_id: str, todo: list[Any], concurrency: int,
    fail_fast: bool, spread: bool | None, observed: Observation, batch_window: str | None = None,
) -> list[Any]:  # fmt: skip
    """A map in a run: a step of its own, its items journaled (see :func:`map_component`)."""
    map_name = f"{spec.name}.map"
    ref = StepRef(id=map_id, name=map_name)
    ctx.writer.emit(StepStartedEvent(run_id=ctx.run_id, step=ref))
    started = time.perf_counter()
    results: list[Any] = [None] * len(todo)
    tracker = MapTracker(ctx, ref, len(todo))

    def settle(i: int, value: Any, ok: bool) -> None:
        results[i] = value
        tracker.add(ok=ok)
        if not ok and fail_fast:
            raise value

    left = replay_items(spec, ctx, map_id, todo, settle)
    replayed = len(todo) - len(left)
    if batch_window is not None:
        with step_scope(ref):
            await map_batched(
                spec, ctx, map_id, todo, left, settle, tracker.show_batch, batch_window
            )
        left = []  # ran, in rounds
    on_cluster = bool(left) and spreads(spec, len(left), spread)
    if on_cluster:
        try:
            await _first_error(
                placement().map_items(
                    spec, todo, left, concurrency=concurrency, ctx=ctx, map_id=map_id,
                    on_result=settle,
                )
            )  # fmt: skip
        except Unplaceable as exc:
            if spec.placed or spread:
                raise
            _stays_here(spec, exc)
            on_cluster = False
    if not on_cluster and left:
        with step_scope(ref):
            await map_in_run(spec, ctx, map_id, todo, left, concurrency=concurrency, settle=settle)
    tracker.publish(final=True)
    seconds = time.perf_counter() - started
    observed.ended(
        failed=tracker.failed, replayed=replayed, seconds=seconds,
        where="cluster" if on_cluster else "loop",
    )  # fmt: skip
    duration = round(seconds * 1e3, 3)
    await ctx.writer.commit([StepCompletedEvent(run_id=ctx.run_id, step=ref, duration_ms=duration)])
    return results


def spreads(spec: StepSpec, n: int, spread: bool | None) -> bool:
    """Whether a map of ``n`` items goes to the map actors. Told (``spread``): as told. A
    placed component: always. Else a large map (``SPREAD_MIN_ITEMS``) of an async function does
    when this process is on a Ray cluster (a run host is): the map actors run its items on
    every core of every node, where the run's own loop has one core (measured in bench/batch:
    1000 LLM calls x1.22-1.39 of plain asyncio on the run's loop, x0.9-1.05 on the map actors
    of two cores). Small maps stay: a chunk's round trip to an actor costs more than they save.
    """
    if spread is not None:
        return spread
    if spec.placed:
        return True
    return n >= SPREAD_MIN_ITEMS and spec.is_async and not spec.streams and placement().active()


_warned: set[str] = set()


def _stays_here(spec: StepSpec, exc: Exception) -> None:
    if spec.name not in _warned:
        _warned.add(spec.name)
        log.warning(
            "%s.map runs on the run's own loop: its function cannot be sent to the map actors "
            "(%s). Pass spread=False to say so, or make it picklable to spread it.",
            spec.name, exc,
        )  # fmt: skip


async def map_direct(
    spec: StepSpec,
    todo: Sequence[Any],
    map_id: str,
    *,
    concurrency: int,
    fail_fast: bool,
    spread: bool | None = None,
) -> list[Any]:
    """Outside a run: plain calls, a :class:`StepError` naming the item in its place."""
    results: list[Any] = [None] * len(todo)
    if spreads(spec, len(todo), spread):

        def settle(i: int, value: Any, ok: bool) -> None:
            results[i] = value
            if not ok and fail_fast:
                raise value

        await _first_error(
            placement().map_items(
                spec, todo, range(len(todo)), concurrency=concurrency, ctx=None, map_id=map_id,
                on_result=settle,
            )
        )  # fmt: skip
        return results

    async def one(i: int) -> None:
        try:
            results[i] = await call_direct(spec, (todo[i],), {}, item_step_id(map_id, i, spec.name))
        except StepError as exc:
            if fail_fast:
                raise
            results[i] = exc

    await bounded(one, range(len(todo)), concurrency)
    return results


async def map_in_run(
    spec: StepSpec,
    ctx: RunContext,
    map_id: str,
    todo: Sequence[Any],
    indexes: Sequence[int],
    *,
    concurrency: int,
    settle: Settle,
) -> None:
    """In a run, on its own loop: every item a quiet step (journaled, no events of its own)."""

    async def one(i: int) -> None:
        step_id = item_step_id(map_id, i, spec.name)
        try:
            value = await call_step(spec, ctx, step_id, (todo[i],), {}, quiet=True)
        except StepError as exc:
            settle(i, exc, False)
            return
        settle(i, value, True)

    await bounded(one, indexes, concurrency)
    await ctx.writer.flush()  # the items' journal entries, queued as they finished


def replay_items(
    spec: StepSpec, ctx: RunContext, map_id: str, todo: Sequence[Any], settle: Settle
) -> list[int]:
    """Settle the items an earlier attempt finished, from the journal; the rest to run."""
    left = []
    for i, item in enumerate(todo):
        step_id = item_step_id(map_id, i, spec.name)
        if step_id not in ctx.journal:
            left.append(i)
            continue
        recorded = ctx.recorded(step_id, spec.name, canonical_hash((item,), {}))
        if recorded is None:  # a rerun's reused item, given another input now: run it
            left.append(i)
            continue
        if recorded.error is not None:
            settle(i, item_error(spec, step_id, recorded.error), False)
        else:
            settle(i, spec.codec.decode(recorded.value), True)
    return left


async def bounded(
    fn: Callable[[int], Awaitable[None]], indexes: Iterable[int], concurrency: int
) -> None:
    """Run ``fn(i)`` for each index with at most ``concurrency`` in flight: a fixed set of
    workers pulling indexes, so memory does not grow with the number of items."""
    pending = iter(indexes)

    async def worker() -> None:
        for i in pending:
            await fn(i)

    n = len(indexes) if isinstance(indexes, Sequence) else concurrency
    await _first_error(_workers(worker, min(concurrency, n)))


async def _workers(worker: Callable[[], Coroutine[Any, Any, None]], n: int) -> None:
    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            tg.create_task(worker())


async def _first_error(work: Awaitable[None]) -> None:
    """``fail_fast``: the caller wants the item's own error, not a group of them."""
    try:
        await work
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None


class MapTracker:
    """Counts a map's items and publishes coalesced ``progress`` events of kind ``map``."""

    def __init__(self, ctx: RunContext, ref: StepRef, total: int) -> None:
        self.ctx, self.ref, self.total = ctx, ref, total
        self.done = self.failed = 0
        self.started = self._last = time.monotonic()
        self.batch: dict[str, Any] | None = None  # llm="batch": the round's batches

    def show_batch(self, batch: dict[str, Any]) -> None:
        self.batch = batch
        self.publish()

    def add(self, *, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if time.monotonic() - self._last >= PROGRESS_EVERY:
            self.publish()

    def publish(self, *, final: bool = False) -> None:
        now = time.monotonic()
        self._last = now
        rate = self.done / max(now - self.started, 1e-9)
        eta = 0.0 if final else round((self.total - self.done) / rate, 2) if rate else None
        data = MapProgress(
            step=self.ref.id, done=self.done, failed=self.failed, total=self.total,
            rate=round(rate, 2), eta=eta, batch=self.batch,
        )  # fmt: skip
        shown = data.model_dump(exclude=None if self.batch else {"batch"})  # batch maps only
        self.ctx.writer.emit(
            ProgressEvent(run_id=self.ctx.run_id, kind="map", data=shown, step=self.ref)
        )
