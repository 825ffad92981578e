"""The run a coroutine belongs to, and where in it: context variables set by the executor.

``asyncio`` copies context into every task, so components called from ``asyncio.gather`` or
``Component.map`` see the run and their parent step without any argument passing. Step positions
are counted per parent, at call time (not when the coroutine first runs), which makes them
deterministic for the same code path.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import JsonValue

from genx_ray.model import JournalEntry, NondeterminismError, ProgressEvent, StepRef, ids
from genx_ray.observe import Observer, observer
from genx_ray.store import AsyncRedis, RunWriter

if TYPE_CHECKING:
    from genx_ray.flow._batching import BatchRound


@dataclass
class Scope:
    """A parent under which steps are numbered: the workflow body, or a running step."""

    step_id: str
    counter: Iterator[int] = field(default_factory=itertools.count)
    # Publishes from the workflow body are numbered apart, so they do not shift step positions.
    publishes: Iterator[int] = field(default_factory=itertools.count)

    def next_step_id(self, name: str) -> str:
        return ids.step_id(self.step_id, next(self.counter), name)

    def next_publish_id(self) -> str:
        return ids.publish_id(self.step_id, next(self.publishes))


@dataclass
class RunContext:
    run_id: str
    workflow: str
    attempt: int
    redis: AsyncRedis
    writer: RunWriter
    journal: dict[str, JournalEntry]
    cancel_requested: bool = False
    tenant: str = "default"
    tags: dict[str, str] = field(default_factory=dict)  # the run's; its child runs inherit them
    origin: str = ""  # 'local': started from a script (genx_ray.start), its children run there
    # Starts a child run in this process (for a script's runs): (child id, workflow).
    start_here: Callable[[str, Any], Awaitable[object]] | None = None
    # What the run's steps, maps and LLM calls report to (the process's, by default).
    observer: Observer = field(default_factory=observer)

    def __post_init__(self) -> None:
        # position (step id without its component name) -> recorded step id, to name the step
        # when a restarted run calls something else at the same place.
        self._positions = {ids.position(sid): sid for sid in self.journal}

    def recorded(self, step_id: str, component: str, input_hash: str) -> JournalEntry | None:
        entry = self.journal.get(step_id)
        if entry is None:
            other = self._positions.get(ids.position(step_id))
            if other is not None and other != step_id:
                raise NondeterminismError(
                    step_id,
                    f"the journal of an earlier attempt recorded {other} at this position; the "
                    f"code now calls {component!r}. Workflow code must take the same path for the "
                    "same input (no randomness, clocks or unordered iteration between steps).",
                )
            return None
        if entry.input_hash != input_hash:
            if entry.reused:  # a rerun's new input reached this step: it runs again
                del self.journal[step_id]
                return None
            raise NondeterminismError(
                step_id,
                f"{component!r} is called with another input than the journal recorded. Workflow "
                "code must pass the same inputs for the same run input.",
            )
        return entry


_run: ContextVar[RunContext | None] = ContextVar("genx_run", default=None)
_scope: ContextVar[Scope | None] = ContextVar("genx_scope", default=None)
_step: ContextVar[StepRef | None] = ContextVar("genx_step", default=None)
# True inside a streaming component: what it yields is its output, so nothing under it (an LLM
# stream it relays) emits the same chunks again.
_streaming: ContextVar[bool] = ContextVar("genx_streaming", default=False)
# The batch round of an llm="batch" map's item: its LLM calls are collected, not sent.
_batch_round: ContextVar[BatchRound | None] = ContextVar("genx_batch_round", default=None)


def current_batch() -> BatchRound | None:
    """The batch round an LLM call belongs to (in a ``llm="batch"`` map's item), or None."""
    return _batch_round.get()


def current_run() -> RunContext | None:
    """The run the calling code belongs to, or None outside any run."""
    return _run.get()


def current_step() -> StepRef | None:
    return _step.get()


def in_streaming_step() -> bool:
    return _streaming.get()


@contextmanager
def streaming_step() -> Iterator[None]:
    token = _streaming.set(True)
    try:
        yield
    finally:
        _streaming.reset(token)


def current_scope() -> Scope | None:
    return _scope.get()


@contextmanager
def _bound(ctx: RunContext | None, scope: Scope | None, step: StepRef | None) -> Iterator[None]:
    tokens = (_run.set(ctx), _scope.set(scope), _step.set(step))
    try:
        yield
    finally:
        _step.reset(tokens[2])
        _scope.reset(tokens[1])
        _run.reset(tokens[0])


def run_scope(ctx: RunContext) -> AbstractContextManager[None]:
    """The workflow body of ``ctx``: steps are numbered from the top."""
    return _bound(ctx, Scope(""), None)


@contextmanager
def step_scope(step: StepRef) -> Iterator[None]:
    tokens = (_scope.set(Scope(step.id)), _step.set(step))
    try:
        yield
    finally:
        _step.reset(tokens[1])
        _scope.reset(tokens[0])


def item_scope(ctx: RunContext | None, step: StepRef) -> AbstractContextManager[None]:
    """A map item run away from its run host (in a map actor): it belongs to the run (publish,
    LLM usage and events reach it) and to its step, but what it calls runs as plain calls, not
    journaled steps: the run host journals the item itself."""
    return _bound(ctx, None, step)


_PUBLISHED = JournalEntry("publish", "").dumps()


def publish(kind: str, data: JsonValue = None) -> None:
    """Append a ``progress`` event with ``kind`` and ``data`` to the current run's stream.

    Returns at once (the write is batched). Outside a run it does nothing, so a component that
    publishes stays callable on its own. Published from the workflow body (not from inside a
    step), the event is journaled with its write: a restarted run does not send it again.
    (Inside a step it belongs to the step: a step that re-runs publishes again.)
    """
    ctx = _run.get()
    if ctx is None:
        return
    step = _step.get()
    event = ProgressEvent(run_id=ctx.run_id, kind=kind, data=data, step=step)
    scope = _scope.get()
    if step is not None or scope is None:
        ctx.writer.emit(event)
        return
    publish_id = scope.next_publish_id()
    if publish_id not in ctx.journal:
        ctx.writer.queue((event,), ((publish_id, _PUBLISHED),))
