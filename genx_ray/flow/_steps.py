"""Executing a step: what a component is (:class:`StepSpec`) and how one call of it runs.

A :class:`~genx_ray.flow._component.Component` is the user-facing handle; this module is what runs
it, wherever it runs (the run host, a map actor, a plain script): the retry loop (written
once), the timeout, the cache key, the journal and the events of a step. Placement (a Ray task)
is :mod:`genx_ray.compute._tasks`; fan-out is :mod:`genx_ray.flow._mapping` and
:mod:`genx_ray.compute._map_actors`.

Inside a run a call is a *step*: its outcome is journaled before the workflow sees it, so a
restarted run gets it back from the journal instead of running it again.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from genx_ray.flow._context import RunContext, current_batch, step_scope, streaming_step
from genx_ray.flow._placement import placement
from genx_ray.flow._retry import NO_RETRY, RetryPolicy
from genx_ray.model import (
    Codec,
    ErrorInfo,
    JournalEntry,
    OutputEvent,
    RunCancelled,
    StepCompletedEvent,
    StepError,
    StepFailedEvent,
    StepRef,
    StepRetryingEvent,
    StepStartedEvent,
    StepTimeout,
    canonical_hash,
    dump_value,
    ids,
    to_json,
    type_hints,
)
from genx_ray.observe import NOTHING, Observation
from genx_ray.store import keys

CacheScope = Literal["tenant", "global"]


@dataclass(frozen=True, eq=False)
class StepSpec:
    """Everything about a component but its handle: the function and how to run it."""

    fn: Callable[..., Any]
    name: str
    retry: RetryPolicy = NO_RETRY
    cache_ttl: float | None = None
    cache_version: str = "1"
    # "tenant": each tenant its own cached results; "global": shared by every tenant (opt-in,
    # for results that depend on the arguments alone and reveal nothing of who asked).
    cache_scope: CacheScope = "tenant"
    timeout: float | None = None
    num_cpus: float | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    node_labels: Mapping[str, str] = field(default_factory=dict)
    remote: bool = False  # asked for a Ray task without any other placement
    streams: bool = field(init=False)
    is_async: bool = field(init=False)
    codec: Codec = field(init=False)

    def __post_init__(self) -> None:
        streams = inspect.isasyncgenfunction(self.fn)
        object.__setattr__(self, "streams", streams)
        object.__setattr__(self, "is_async", inspect.iscoroutinefunction(self.fn))
        annotation = Any if streams else type_hints(self.fn).get("return", Any)
        object.__setattr__(self, "codec", Codec(annotation))

    @property
    def placed(self) -> bool:
        """Whether an attempt runs as a Ray task (and a map goes to the map actors)."""
        return self.remote or self.num_cpus is not None or bool(self.resources or self.node_labels)

    def replace(self, **changes: Any) -> StepSpec:
        """A copy with ``changes``; what was derived from the function (its codec...) is kept,
        not derived again: a spec unpickled in another process may not resolve the function's
        annotations there (a function pickled by value carries only the globals its code uses)."""
        new = copy.copy(self)
        for name, value in changes.items():
            object.__setattr__(new, name, value)
        return new

    def here(self) -> StepSpec:
        """This spec with its placement spent: where it is now is where it runs."""
        return self.replace(remote=False, num_cpus=None, resources={}, node_labels={})


def cache_key(spec: StepSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any], tenant: str) -> str:
    """The key of a call's cached result: the calling run's tenant's, unless the component
    shares its cache (``cache_scope="global"``)."""
    digest = canonical_hash(spec.name, args, kwargs)
    scope = None if spec.cache_scope == "global" else tenant
    return keys.cache(spec.name, spec.cache_version, digest, scope)


def step_error(spec: StepSpec, ref: StepRef, exc: BaseException) -> StepError:
    """The error a failed step raises into its workflow (the step's own error as the cause)."""
    kind = StepTimeout if isinstance(exc, TimeoutError) else StepError
    message = str(exc) or (f"timed out after {spec.timeout}s" if kind is StepTimeout else "")
    return kind(ref.id, spec.name, ref.attempt, type(exc).__name__, message)


def item_error(spec: StepSpec, step_id: str, error: Mapping[str, Any]) -> StepError:
    """A map item's error as it was recorded (journal, map actor), as a StepError again."""
    kind = StepTimeout if error["type"] == "TimeoutError" else StepError
    attempts = int(error.get("attempts", 1))
    return kind(step_id, spec.name, attempts, error["type"], error["message"])


async def with_retries(
    spec: StepSpec,
    attempt: Callable[[int], Awaitable[Any]],
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> tuple[Any, int]:
    """Call ``attempt(n)`` for n = 1, 2... until it returns or the retry policy gives up.

    Returns (value, attempts). Gives up by raising the last attempt's exception with
    ``attempts`` set on it as ``__genx_attempts__``. Cancellation is never retried.
    """
    n = 1
    while True:
        try:
            return await attempt(n), n
        except (asyncio.CancelledError, RunCancelled):
            raise
        except Exception as exc:
            if n >= spec.retry.max_attempts or not spec.retry.retryable(exc):
                exc.__genx_attempts__ = n  # type: ignore[attr-defined]
                raise
            delay = spec.retry.delay(n, exc)
            if on_retry is not None:
                on_retry(n, exc, delay)
            if current_batch() is None:  # in a batch map, the next round is the delay
                await asyncio.sleep(delay)
            n += 1


def attempts_of(exc: BaseException) -> int:
    return int(getattr(exc, "__genx_attempts__", 1))


async def call_direct(
    spec: StepSpec,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    step_id: str | None = None,
) -> Any:
    """Call outside a run, with retries and timeout. Gives up with the call's own exception;
    a map item (``step_id``) with a :class:`StepError` naming it, that exception as its cause."""
    try:
        value, _ = await with_retries(spec, lambda _n: _attempt(spec, None, None, args, kwargs))
        return value
    except Exception as exc:
        if step_id is None:
            raise
        ref = StepRef(id=step_id, name=spec.name, attempt=attempts_of(exc))
        raise step_error(spec, ref, exc) from exc


async def call_step(
    spec: StepSpec,
    ctx: RunContext,
    step_id: str,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    quiet: bool = False,
) -> Any:
    """Run as a step of ``ctx``: replayed from the journal if an earlier attempt finished it,
    else run (cache, retries, timeout) and journaled.

    ``quiet`` (map items): no started/completed events, and the journal entry is queued, not
    waited for: the map flushes once for all of its items.
    """
    if ctx.cancel_requested:
        raise RunCancelled(ctx.run_id)
    input_hash = canonical_hash(args, kwargs)
    recorded = ctx.recorded(step_id, spec.name, input_hash)
    if recorded is not None:
        if not quiet:
            ctx.observer.step_replayed(spec.name, step_id)
        return _replay(spec, ctx, StepRef(id=step_id, name=spec.name), recorded, quiet)
    if quiet:  # a map item has no observation of its own (it is one of its map's)
        return await _execute(spec, ctx, step_id, input_hash, args, kwargs, quiet, NOTHING)
    with ctx.observer.step(spec.name, step_id) as observed:
        return await _execute(spec, ctx, step_id, input_hash, args, kwargs, quiet, observed)


async def _execute(
    spec: StepSpec, ctx: RunContext, step_id: str, input_hash: str, args: tuple[Any, ...],
    kwargs: Mapping[str, Any], quiet: bool, observed: Observation,
) -> Any:  # fmt: skip
    """A step no earlier attempt finished: from the cache, or run (retries, timeout); then
    journaled."""
    key = None
    if spec.cache_ttl:
        key = cache_key(spec, args, kwargs, ctx.tenant)
        hit = await ctx.redis.get(key)
        if hit is not None:
            value = json.loads(hit)
            done = StepCompletedEvent(
                run_id=ctx.run_id, step=StepRef(id=step_id, name=spec.name), cached=True
            )
            await _record(ctx, quiet, done, step_id, JournalEntry(spec.name, input_hash, value))
            observed.ended(cache_hit=True)
            return spec.codec.decode(value)

    started = time.perf_counter()
    if not quiet:
        ctx.writer.emit(
            StepStartedEvent(run_id=ctx.run_id, step=StepRef(id=step_id, name=spec.name))
        )

    def retrying(n: int, exc: BaseException, delay: float) -> None:
        rnd = current_batch()
        if rnd is not None and not rnd.announces(ids.attempt_scope_id(step_id, n)):
            return  # a batch map's item replaying a failure it told of when it was read
        observed.retried(n, exc, delay)
        ctx.writer.emit(
            StepRetryingEvent(
                run_id=ctx.run_id, step=StepRef(id=step_id, name=spec.name, attempt=n),
                delay=round(delay, 3), error=ErrorInfo.from_exception(exc, with_traceback=False),
            )
        )  # fmt: skip

    def attempt(n: int) -> Awaitable[Any]:
        return _attempt(spec, ctx, StepRef(id=step_id, name=spec.name, attempt=n), args, kwargs)

    try:
        value, n = await with_retries(spec, attempt, retrying)
    except (asyncio.CancelledError, RunCancelled):
        raise
    except Exception as exc:
        ref = StepRef(id=step_id, name=spec.name, attempt=attempts_of(exc))
        _ended(ctx, observed, spec.name, step_id, quiet, started, ref.attempt, exc)
        error = ErrorInfo.from_exception(exc)
        # The failure is journaled too: a restarted run that caught it and fell back takes the
        # same fallback without paying for the failing step again.
        failure = JournalEntry(spec.name, input_hash, error=_recorded_error(error, ref.attempt))
        failed = StepFailedEvent(run_id=ctx.run_id, step=ref, error=error)
        await _record(ctx, quiet, failed, step_id, failure)
        raise step_error(spec, ref, exc) from exc

    seconds = _ended(ctx, observed, spec.name, step_id, quiet, started, n)
    encoded = spec.codec.encode(value)
    done = StepCompletedEvent(
        run_id=ctx.run_id, step=StepRef(id=step_id, name=spec.name, attempt=n),
        duration_ms=round(seconds * 1e3, 3),
    )  # fmt: skip
    await _record(ctx, quiet, done, step_id, JournalEntry(spec.name, input_hash, encoded))
    if key is not None and spec.cache_ttl:
        await ctx.redis.set(key, dump_value(encoded), px=int(spec.cache_ttl * 1000))
    return value


def _ended(
    ctx: RunContext, observed: Observation, component: str, step_id: str, quiet: bool,
    started: float, attempts: int, error: BaseException | None = None,
) -> float:  # fmt: skip
    """Report how a step that ran ended (a map item as an item of its map); its seconds."""
    seconds = time.perf_counter() - started
    if quiet:
        error_type = type(error).__name__ if error is not None else None
        ctx.observer.item_ended(component, step_id, seconds, error_type)
        return seconds
    if error is not None:
        observed.failed(error)
    observed.ended(attempts=attempts, seconds=seconds)
    return seconds


def _recorded_error(error: ErrorInfo, attempts: int) -> dict[str, Any]:
    return {"type": error.type, "message": error.message, "attempts": attempts}


async def _record(
    ctx: RunContext, quiet: bool, event: Any, step_id: str, entry: JournalEntry
) -> None:
    """Journal a step's outcome with its event (none for a quiet map item, whose failure still
    gets its ``step.failed``); a loud step waits until both are stored."""
    if quiet and not isinstance(event, StepFailedEvent):
        ctx.writer.queue((), ((step_id, entry.dumps()),))
        return
    await ctx.writer.commit((event,), ((step_id, entry.dumps()),))


def _replay(spec: StepSpec, ctx: RunContext, ref: StepRef, entry: JournalEntry, quiet: bool) -> Any:
    if entry.error is not None:
        error = ErrorInfo(type=entry.error["type"], message=entry.error["message"])
        if not quiet:
            ctx.writer.emit(
                StepFailedEvent(run_id=ctx.run_id, step=ref, error=error,
                                replayed=not entry.reused, reused=entry.reused)
            )  # fmt: skip
        raise item_error(spec, ref.id, entry.error)
    if not quiet:
        ctx.writer.emit(
            StepCompletedEvent(run_id=ctx.run_id, step=ref, replayed=not entry.reused,
                               reused=entry.reused)
        )  # fmt: skip
    return spec.codec.decode(entry.value)


async def _attempt(
    spec: StepSpec,
    ctx: RunContext | None,
    ref: StepRef | None,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Any:
    """One attempt, within the timeout; in a run, under the step's scope, so what it calls
    are nested steps (those of a retried attempt get their own ids, so a retry re-runs them)."""
    if ref is None:
        return await _with_timeout(spec, _invoke(spec, None, None, args, kwargs))
    scope = (
        ref
        if ref.attempt == 1
        else ref.model_copy(update={"id": ids.attempt_scope_id(ref.id, ref.attempt)})
    )
    with step_scope(scope):
        return await _with_timeout(spec, _invoke(spec, ctx, ref, args, kwargs))


async def _with_timeout(spec: StepSpec, coro: Awaitable[Any]) -> Any:
    # A batch map's item waits for its round's batch (hours, maybe): no timeout of its own.
    if spec.timeout is None or current_batch() is not None:
        return await coro
    async with asyncio.timeout(spec.timeout):
        return await coro


async def _invoke(
    spec: StepSpec,
    ctx: RunContext | None,
    ref: StepRef | None,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Any:
    if spec.placed:
        result = await placement().run_task(spec, args, dict(kwargs))
        return aggregate(result) if spec.streams else result
    if spec.streams:
        chunks = []
        with streaming_step():
            async for chunk in cast(AsyncIterator[Any], spec.fn(*args, **kwargs)):
                chunks.append(chunk)
                if ctx is not None:
                    ctx.writer.emit(OutputEvent(run_id=ctx.run_id, data=to_json(chunk), step=ref))
        return aggregate(chunks)
    if spec.is_async:
        return await spec.fn(*args, **kwargs)
    return await asyncio.to_thread(spec.fn, *args, **kwargs)  # copies context: publish works


def aggregate(chunks: list[Any]) -> Any:
    """A streaming component's return value: text chunks joined, anything else as a list."""
    if chunks and all(isinstance(c, str) for c in chunks):
        return "".join(chunks)
    return chunks
