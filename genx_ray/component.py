"""Components: reusable, idempotent steps with retry, cache, timeout and placement.

Calling a component inside a run makes it a *step*: it gets a deterministic id (parent step,
position among its siblings, component name), its outcome is journaled in Redis, and a restarted
run gets the recorded outcome back without running it again. Outside any run, a component is
just the function with its retry and timeout: independently testable.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, ParamSpec, TypeVar, cast, overload

from genx_ray import keys
from genx_ray.context import (
    JournalEntry,
    RunContext,
    current_run,
    current_scope,
    step_scope,
    streaming_step,
)
from genx_ray.errors import RunCancelled, StepError, StepTimeout, UserError
from genx_ray.events import (
    ErrorInfo,
    Output,
    Progress,
    StepCompleted,
    StepFailed,
    StepRef,
    StepRetrying,
    StepStarted,
)
from genx_ray.retry import NO_RETRY, RetryPolicy
from genx_ray.settings import Settings
from genx_ray.values import Codec, canonical_hash, dumps, to_json, type_hints

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_PROGRESS_EVERY = 0.5  # seconds between coalesced map progress events


def _check_name(name: str) -> str:
    if not name or any(c in name for c in "/:@ \n"):
        raise UserError(f"component name {name!r}: use letters, digits, '_', '-' and '.'")
    return name


class Component(Generic[P, R]):
    """A step. Build one with :func:`component`; the ``with_*`` methods return new components."""

    def __init__(
        self,
        fn: Callable[P, Any],
        *,
        name: str | None = None,
        retry: RetryPolicy = NO_RETRY,
        cache_ttl: float | None = None,
        cache_version: str = "1",
        timeout: float | None = None,
        num_cpus: float | None = None,
        resources: Mapping[str, float] | None = None,
        node_labels: Mapping[str, str] | None = None,
        remote: bool = False,
    ) -> None:
        if not callable(fn):
            raise UserError(f"@component needs a function, got {fn!r}")
        self.fn = fn
        self.name = _check_name(name or fn.__name__)
        self.retry = retry
        self.cache_ttl = cache_ttl
        self.cache_version = cache_version
        self.timeout = timeout
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.node_labels = dict(node_labels or {})
        self._remote = remote
        self._streams = inspect.isasyncgenfunction(fn)
        self._is_async = inspect.iscoroutinefunction(fn)
        hints = type_hints(fn)
        self.codec = Codec(Any if self._streams else hints.get("return", Any))
        functools.update_wrapper(self, fn)

    # -- configuration: each returns a new component, the original is untouched ----------------

    def _replace(self, **changes: Any) -> Component[P, R]:
        new = copy.copy(self)
        for attr, value in changes.items():
            setattr(new, attr, value)
        return new

    def with_retry(self, policy: RetryPolicy | None = None, **fields: Any) -> Component[P, R]:
        """``with_retry(max_attempts=4)`` changes fields of the current policy."""
        return self._replace(retry=dataclasses.replace(policy or self.retry, **fields))

    def with_cache(self, ttl: float | None, *, version: str | None = None) -> Component[P, R]:
        """Cache results in Redis for ``ttl`` seconds (None: no cache). Bump ``version`` when the
        code changes what it returns for the same input."""
        return self._replace(cache_ttl=ttl, cache_version=version or self.cache_version)

    def with_timeout(self, seconds: float | None) -> Component[P, R]:
        return self._replace(timeout=seconds)

    def with_resources(
        self,
        *,
        num_cpus: float | None = None,
        resources: Mapping[str, float] | None = None,
        node_labels: Mapping[str, str] | None = None,
    ) -> Component[P, R]:
        """Run each attempt as a Ray task placed by these requirements."""
        return self._replace(
            num_cpus=num_cpus,
            resources=dict(resources or {}),
            node_labels=dict(node_labels or {}),
        )

    def with_name(self, name: str) -> Component[P, R]:
        return self._replace(name=_check_name(name))

    @property
    def remote(self) -> bool:
        return self._remote or self.num_cpus is not None or bool(self.resources or self.node_labels)

    def __repr__(self) -> str:
        return f"<component {self.name}>"

    # -- calling --------------------------------------------------------------------------------

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        ctx = current_run()
        scope = current_scope()
        if ctx is None or scope is None:
            return self._call_direct(args, kwargs)
        # The position is taken now, at call time, so it follows program order even when the
        # coroutines are scheduled by gather in another order.
        return self._call_step(ctx, scope.next_step_id(self.name), args, kwargs)

    async def _call_direct(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], step_id: str | None = None
    ) -> R:
        """Call outside a run, with retries. Gives up with the call's own exception; a map
        item (``step_id``) with a :class:`StepError` naming it, that exception as its cause."""
        attempt = 1
        while True:
            try:
                return cast(R, await self._attempt(None, None, args, kwargs))
            except Exception as exc:
                if attempt >= self.retry.max_attempts or not self.retry.retryable(exc):
                    if step_id is None:
                        raise
                    ref = StepRef(id=step_id, name=self.name, attempt=attempt)
                    raise self._step_error(ref, exc) from exc
                await asyncio.sleep(self.retry.delay(attempt, exc))
                attempt += 1

    def _cache_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        return keys.cache(self.name, self.cache_version, canonical_hash(self.name, args, kwargs))

    def _item_error(self, step_id: str, error: Mapping[str, Any]) -> StepError:
        """A map item's error as it was recorded (journal, pool actor), as a StepError again."""
        kind = StepTimeout if error["type"] == "TimeoutError" else StepError
        return kind(step_id, self.name, int(error.get("attempts", 1)), error["type"],
                    error["message"])  # fmt: skip

    async def _call_step(
        self,
        ctx: RunContext,
        step_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        quiet: bool = False,
    ) -> R:
        """Run as a step of ``ctx``. ``quiet`` (map items): no started/completed events."""
        if ctx.cancel_requested:
            raise RunCancelled(ctx.run_id)
        input_hash = canonical_hash(args, kwargs)
        ref = StepRef(id=step_id, name=self.name)
        recorded = ctx.recorded(step_id, self.name, input_hash)
        if recorded is not None:
            return self._replay(ctx, ref, recorded, quiet)

        cache_key = None
        if self.cache_ttl:
            cache_key = self._cache_key(args, kwargs)
            hit = await ctx.redis.get(cache_key)
            if hit is not None:
                entry = JournalEntry(self.name, input_hash, value=json.loads(hit))
                await ctx.writer.commit(
                    [] if quiet else [StepCompleted(run_id=ctx.run_id, step=ref, cached=True)],
                    [(step_id, entry.dumps())],
                )
                return cast(R, self.codec.decode(entry.value))

        if not quiet:
            ctx.writer.emit(StepStarted(run_id=ctx.run_id, step=ref))
        started = time.perf_counter()
        attempt = 1
        while True:
            ref = StepRef(id=step_id, name=self.name, attempt=attempt)
            try:
                value = await self._attempt(ctx, ref, args, kwargs)
                break
            except (asyncio.CancelledError, RunCancelled):
                raise
            except Exception as exc:
                if attempt < self.retry.max_attempts and self.retry.retryable(exc):
                    delay = self.retry.delay(attempt, exc)
                    ctx.writer.emit(
                        StepRetrying(
                            run_id=ctx.run_id, step=ref, delay=round(delay, 3),
                            error=ErrorInfo.from_exception(exc, with_traceback=False),
                        )
                    )  # fmt: skip
                    await asyncio.sleep(delay)
                    attempt += 1
                    continue
                await self._record_failure(ctx, ref, input_hash, exc)
                raise self._step_error(ref, exc) from exc

        encoded = self.codec.encode(value)
        entry = JournalEntry(self.name, input_hash, value=encoded)
        done = StepCompleted(
            run_id=ctx.run_id, step=ref, duration_ms=round((time.perf_counter() - started) * 1e3, 3)
        )
        await ctx.writer.commit([] if quiet else [done], [(step_id, entry.dumps())])
        if cache_key is not None and self.cache_ttl:
            await ctx.redis.set(cache_key, dumps(encoded), px=int(self.cache_ttl * 1000))
        return cast(R, value)

    def _replay(self, ctx: RunContext, ref: StepRef, entry: JournalEntry, quiet: bool) -> R:
        if entry.error is not None:
            error = ErrorInfo.model_validate(entry.error)
            if not quiet:
                ctx.writer.emit(StepFailed(run_id=ctx.run_id, step=ref, error=error, replayed=True))
            raise StepError(ref.id, self.name, ref.attempt, error.type, error.message)
        if not quiet:
            ctx.writer.emit(StepCompleted(run_id=ctx.run_id, step=ref, replayed=True))
        return cast(R, self.codec.decode(entry.value))

    async def _record_failure(
        self, ctx: RunContext, ref: StepRef, input_hash: str, exc: BaseException
    ) -> None:
        error = ErrorInfo.from_exception(exc)
        # Journal the failure too: a restarted run that caught it and fell back takes the same
        # fallback without paying for the failing step again.
        entry = JournalEntry(self.name, input_hash, error=error.model_dump(exclude={"traceback"}))
        await ctx.writer.commit(
            [StepFailed(run_id=ctx.run_id, step=ref, error=error)], [(ref.id, entry.dumps())]
        )

    def _step_error(self, ref: StepRef, exc: BaseException) -> StepError:
        kind = StepTimeout if isinstance(exc, TimeoutError) else StepError
        message = str(exc) or (f"timed out after {self.timeout}s" if kind is StepTimeout else "")
        return kind(ref.id, self.name, ref.attempt, type(exc).__name__, message)

    async def _attempt(
        self,
        ctx: RunContext | None,
        ref: StepRef | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if ref is None:
            return await self._with_timeout(self._invoke(None, None, args, kwargs))
        # Nested steps of a retried attempt get their own ids, so a retry re-runs them.
        scope_ref = (
            ref if ref.attempt == 1 else ref.model_copy(update={"id": f"{ref.id}@{ref.attempt}"})
        )
        with step_scope(scope_ref):
            return await self._with_timeout(self._invoke(ctx, ref, args, kwargs))

    async def _with_timeout(self, coro: Awaitable[Any]) -> Any:
        if self.timeout is None:
            return await coro
        async with asyncio.timeout(self.timeout):
            return await coro

    async def _invoke(
        self,
        ctx: RunContext | None,
        ref: StepRef | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if self.remote:
            from genx_ray.remote import run_as_task

            result = await run_as_task(self, args, kwargs)
            return _aggregate(result) if self._streams else result
        if self._streams:
            chunks = []
            with streaming_step():
                async for chunk in cast(AsyncIterator[Any], self.fn(*args, **kwargs)):
                    chunks.append(chunk)
                    if ctx is not None:
                        ctx.writer.emit(Output(run_id=ctx.run_id, data=to_json(chunk), step=ref))
            return _aggregate(chunks)
        if self._is_async:
            return await cast(Awaitable[Any], self.fn(*args, **kwargs))
        return await asyncio.to_thread(self.fn, *args, **kwargs)  # copies context: publish works

    # -- fan-out --------------------------------------------------------------------------------

    async def map(
        self, items: Iterable[Any], *, concurrency: int | None = None, fail_fast: bool = False
    ) -> list[R | StepError]:
        """Call the component on every item, at most ``concurrency`` at a time: by default the
        largest concurrency budget of ``GENX_LLM_LIMITS`` (the limiter still holds each model to
        its own), or 16 without one.

        Results come back in input order. An item that fails after its retries gives its
        :class:`StepError` in its place instead of failing the batch (``fail_fast=True`` raises
        the first one instead). In a run, every finished item is journaled (a restarted run
        does not redo it), and progress is published as coalesced ``progress`` events of kind
        ``map`` (a few per second at most, whatever the batch size).

        A placed component (``resources``, ``num_cpus``, ``node_labels`` or ``remote=True``)
        maps over the Ray cluster: its items go in chunks to one async pool actor per node,
        ``concurrency`` spread over the nodes within what each node's resources allow
        (see :mod:`genx_ray.pool`). Any other component maps on the run's own event loop.
        """
        if concurrency is None:
            concurrency = default_map_concurrency()
        if concurrency < 1:
            raise UserError("map concurrency must be at least 1")
        todo = list(items)
        results: list[Any] = [None] * len(todo)
        scope = current_scope()
        ctx = current_run() if scope is not None else None  # a run, and a place in it
        map_id = scope.next_step_id(f"{self.name}.map") if scope is not None else f"{self.name}.map"
        ref = StepRef(id=map_id, name=f"{self.name}.map")
        tracker = _MapProgress(ctx, ref, len(todo)) if ctx is not None else None
        if ctx is not None:
            ctx.writer.emit(StepStarted(run_id=ctx.run_id, step=ref))
        started = time.perf_counter()

        def settle(i: int, value: Any, ok: bool) -> None:
            results[i] = value
            if tracker is not None:
                tracker.add(ok=ok)
            if not ok and fail_fast:
                raise value

        if self.remote:
            from genx_ray.pool import map_on_cluster

            left = list(range(len(todo)))
            if ctx is not None:
                left = self._replay_items(ctx, map_id, todo, settle)
            try:
                await map_on_cluster(
                    self, todo, left, concurrency=concurrency, ctx=ctx,
                    map_id=map_id, on_result=settle,
                )  # fmt: skip
            except BaseExceptionGroup as group:  # fail_fast: the caller wants the item's error
                raise group.exceptions[0] from None
        elif ctx is None:

            async def direct(i: int) -> None:
                try:
                    step_id = f"{map_id}/{i}:{self.name}"
                    results[i] = await self._call_direct((todo[i],), {}, step_id)
                except StepError as exc:
                    if fail_fast:
                        raise
                    results[i] = exc

            await _bounded(direct, len(todo), concurrency)
            return results
        else:

            async def one(i: int) -> None:
                try:
                    value = await self._call_step(
                        ctx, f"{map_id}/{i}:{self.name}", (todo[i],), {}, quiet=True
                    )
                    settle(i, value, True)
                except StepError as exc:
                    settle(i, exc, False)

            with step_scope(ref):
                await _bounded(one, len(todo), concurrency)
        if ctx is not None and tracker is not None:
            tracker.publish(final=True)
            done = StepCompleted(
                run_id=ctx.run_id, step=ref,
                duration_ms=round((time.perf_counter() - started) * 1e3, 3),
            )  # fmt: skip
            await ctx.writer.commit([done])
        return results

    def _replay_items(
        self, ctx: RunContext, map_id: str, todo: list[Any],
        settle: Callable[[int, Any, bool], None],
    ) -> list[int]:  # fmt: skip
        """Settle the items a previous attempt finished, from the journal; the rest to run."""
        left = []
        for i, item in enumerate(todo):
            step_id = f"{map_id}/{i}:{self.name}"
            entry = ctx.journal.get(step_id)
            if entry is None:
                left.append(i)
                continue
            recorded = ctx.recorded(step_id, self.name, canonical_hash((item,), {}))
            assert recorded is not None
            if recorded.error is not None:
                settle(i, self._item_error(step_id, recorded.error), False)
            else:
                settle(i, self.codec.decode(recorded.value), True)
        return left


DEFAULT_MAP_CONCURRENCY = 16


def default_map_concurrency() -> int:
    """What ``map`` keeps in flight when not told: enough for the largest LLM budget."""
    caps = [limit.concurrency for limit in Settings.from_env().llm_limits.values()]
    return max((cap for cap in caps if cap), default=DEFAULT_MAP_CONCURRENCY)


async def _bounded(fn: Callable[[int], Awaitable[None]], n: int, concurrency: int) -> None:
    """Run ``fn(0..n-1)`` with at most ``concurrency`` in flight: a fixed set of workers pulling
    indexes, so memory does not grow with ``n``."""
    indexes = iter(range(n))

    async def worker() -> None:
        for i in indexes:
            await fn(i)

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(min(concurrency, n)):
                tg.create_task(worker())
    except BaseExceptionGroup as group:  # fail_fast: the caller wants the item's own error
        raise group.exceptions[0] from None


class _MapProgress:
    def __init__(self, ctx: RunContext, ref: StepRef, total: int) -> None:
        self.ctx, self.ref, self.total = ctx, ref, total
        self.done = self.failed = 0
        self.started = self._last = time.monotonic()

    def add(self, *, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if time.monotonic() - self._last >= _PROGRESS_EVERY:
            self.publish()

    def publish(self, *, final: bool = False) -> None:
        now = time.monotonic()
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        data = {
            "step": self.ref.id, "done": self.done, "failed": self.failed, "total": self.total,
            "rate": round(rate, 2),
            "eta": 0.0 if final else round((self.total - self.done) / rate, 2) if rate else None,
        }  # fmt: skip
        self.ctx.writer.emit(Progress(run_id=self.ctx.run_id, kind="map", data=data, step=self.ref))


def _aggregate(chunks: list[Any]) -> Any:
    """A streaming component's return value: text chunks joined, anything else as a list."""
    if chunks and all(isinstance(c, str) for c in chunks):
        return "".join(chunks)
    return chunks


@overload
def component(fn: Callable[P, Awaitable[R]], /) -> Component[P, R]: ...
@overload
def component(fn: Callable[P, AsyncIterator[T]], /) -> Component[P, Any]: ...
@overload
def component(fn: Callable[P, R], /) -> Component[P, R]: ...
@overload
def component(
    *,
    name: str | None = None,
    retry: RetryPolicy | None = None,
    cache_ttl: float | None = None,
    cache_version: str = "1",
    timeout: float | None = None,
    num_cpus: float | None = None,
    resources: Mapping[str, float] | None = None,
    node_labels: Mapping[str, str] | None = None,
    remote: bool = False,
) -> Callable[[Callable[P, Any]], Component[P, Any]]: ...
def component(fn: Any = None, /, **options: Any) -> Any:
    """Make a function a component: ``@component`` or ``@component(retry=..., cache_ttl=...)``.

    Async functions run on the run's event loop, sync ones in a thread (never blocking the loop),
    async generators stream each chunk as an ``output`` event and return the chunks joined.
    Placement options (``num_cpus``, ``resources``, ``node_labels``, ``remote=True``) run each
    attempt as a Ray task.
    """
    if options.get("retry") is None:
        options.pop("retry", None)
    if fn is not None:
        return Component(fn, **options)
    return lambda f: Component(f, **options)
