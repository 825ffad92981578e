"""The one seam between the engine and its observability: what happens, reported once.

The engine (attempts, steps, maps, map actors, Ray tasks, the LLM transport, the run store)
reports each thing that happens to an :class:`Observer`, and never calls tracing or metrics
itself. Traces (:class:`~genx_ray.observe._tracing.Tracing`) and Prometheus metrics
(:class:`~genx_ray.observe._metrics.Metrics`) are two implementations; :class:`Observers`
composes them, as Temporal's interceptors chain and OpenTelemetry's instrumentations plug in.

Two shapes of hook:

- a thing that takes time returns an :class:`Observation` (a context manager: what starts in
  its block is its child, in the trace) and is told how it ended (``ended``/``failed``);
- a thing that happens at once is one call (``step_replayed``, ``item_ended``...).

Work done elsewhere on behalf of a run (a map actor's chunk, a Ray task) is observed there as a
:meth:`Observer.remote` observation: it continues the trace of the :meth:`Observer.context` sent
with the work, and what it recorded (:data:`Carried`) goes back with its results, to be added
where the run is (:meth:`Observer.absorb`): a map actor's LLM calls count for the run's worker.

What must stay true: an observer never raises into the engine, and a disabled one costs a call:
with tracing off no span object is built (the process's observer is then :class:`Metrics`
alone). The process's observer is :func:`~genx_ray.observe._process.observer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genx_ray.model import Run

# What a remote observation carries back (metrics recorded there): opaque to the engine.
Carried = Any


class Observation:
    """Something under way. The base does nothing: an implementation overrides what it needs."""

    __slots__ = ()

    def __enter__(self) -> Observation:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def retried(self, attempt: int, error: BaseException, delay: float) -> None:
        """A step's attempt ``attempt`` failed and is retried after ``delay`` seconds."""

    def ended(self, **outcome: Any) -> None:
        """It ended; what is known of how: ``status`` (an attempt), ``attempts``, ``seconds``,
        ``cache_hit`` (a step), ``failed``, ``replayed``, ``where`` (a map), ``input_tokens``,
        ``output_tokens``, ``finish_reasons``, ``response`` (an LLM call)."""

    def failed(self, error: BaseException | str, error_type: str | None = None) -> None:
        """It failed (the error, or a reason and its type)."""

    @property
    def carried(self) -> Carried:
        """A remote observation: what it recorded, to send back (None: nothing)."""
        return None


NOTHING = Observation()


class Observer:
    """The hooks. The base observes nothing; see the module docstring for the contract."""

    # -- runs -------------------------------------------------------------------------------------

    def run_context(self, run_id: str, workflow: str) -> str | None:
        """A run is being created: the trace context its attempts will join (a
        ``traceparent``, kept in its record), if this observer keeps one."""
        return None

    def run_created(self, workflow: str) -> None:
        """A run was created (not found existing: creating is idempotent)."""

    def attempt(self, run: Run, replayable: int) -> Observation:
        """An attempt of ``run`` starts (its journal holds ``replayable`` steps); ended with
        ``status`` (None: superseded by another attempt)."""
        return NOTHING

    def run_ended(self, workflow: str, status: str) -> None:
        """A run ended outside any attempt (its script's process is gone, say)."""

    # -- steps and maps ---------------------------------------------------------------------------

    def step(self, component: str, step_id: str) -> Observation:
        """A step starts running (not replayed); ended with ``attempts``, ``seconds`` and
        ``cache_hit``, or failed and then ended."""
        return NOTHING

    def step_replayed(self, component: str, step_id: str) -> None:
        """A step an earlier attempt finished: returned from the journal, not run."""

    def item_ended(
        self, component: str, step_id: str, seconds: float, error_type: str | None = None
    ) -> None:
        """A map item ended (items are quiet: they have no observation of their own)."""

    def map(self, component: str, map_id: str, items: int, concurrency: int) -> Observation:
        """A map starts; ended with ``failed``, ``replayed``, ``where`` and ``seconds``."""
        return NOTHING

    # -- work done elsewhere for a run ------------------------------------------------------------

    def context(self) -> str | None:
        """What to send with work done in another process, for :meth:`remote` there."""
        return None

    def remote(
        self, context: str | None, kind: str, component: str, attributes: Mapping[str, Any]
    ) -> Observation:
        """Work for a run, in this process, sent from another (``kind``: ``chunk`` of a map on
        a map actor, ``task`` for a placed attempt). Its :attr:`Observation.carried` goes back."""
        return NOTHING

    def absorb(self, carried: Carried) -> None:
        """Add what a remote observation carried back."""

    # -- LLM calls --------------------------------------------------------------------------------

    def llm_waited(self, model: str, seconds: float) -> None:
        """An LLM request waited this long for room in its budget."""

    def llm_request(
        self, model: str, operation: str, *, attempt: int, waited: float, step_id: str | None,
        server: tuple[str, int | None] | None,
    ) -> Observation:  # fmt: skip
        """One HTTP request of an LLM call; ended with tokens, or failed."""
        return NOTHING

    def llm_rate_limited(self, model: str) -> None:
        """The provider answered 429."""

    def llm_retry(self, model: str) -> None:
        """An LLM request is retried."""

    def llm_gave_up(self, model: str) -> None:
        """An LLM call failed for good on ``model`` (after its retries)."""

    # -- schedules (the timer service) -------------------------------------------------------------

    def schedule_skipped(self, reason: str) -> None:
        """A schedule's tick started no run: ``quota`` (its tenant over GENX_TENANT_LIMITS) or
        ``overlap`` (its previous run still open)."""

    # -- event streams (the gateway) --------------------------------------------------------------

    def stream(self, fmt: str) -> Observation:
        """A client follows a run's events (``sse`` or ``ndjson``) for the observation's block."""
        return NOTHING

    def delivered(self, entry_ids: Iterable[bytes], since_ms: float, fmt: str) -> None:
        """Events (by their stream ids, ``<ms>-<seq>``) were written to a client; those appended
        before ``since_ms`` are a replay, not a delay."""


class _Both(Observation):
    __slots__ = ("parts",)

    def __init__(self, parts: Sequence[Observation]) -> None:
        self.parts = parts

    def __enter__(self) -> Observation:
        for part in self.parts:
            part.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for part in reversed(self.parts):
            part.__exit__(kind, exc, tb)

    def retried(self, attempt: int, error: BaseException, delay: float) -> None:
        for part in self.parts:
            part.retried(attempt, error, delay)

    def ended(self, **outcome: Any) -> None:
        for part in self.parts:
            part.ended(**outcome)

    def failed(self, error: BaseException | str, error_type: str | None = None) -> None:
        for part in self.parts:
            part.failed(error, error_type)

    @property
    def carried(self) -> Carried:
        for part in self.parts:
            if part.carried is not None:
                return part.carried
        return None


def _joined(parts: list[Observation]) -> Observation:
    real = [p for p in parts if p is not NOTHING]
    if not real:
        return NOTHING
    return real[0] if len(real) == 1 else _Both(real)


class Observers(Observer):
    """Several observers as one: each hook goes to each, in order."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def run_context(self, run_id: str, workflow: str) -> str | None:
        found = None
        for o in self.observers:
            found = o.run_context(run_id, workflow) or found
        return found

    def run_created(self, workflow: str) -> None:
        for o in self.observers:
            o.run_created(workflow)

    def attempt(self, run: Run, replayable: int) -> Observation:
        return _joined([o.attempt(run, replayable) for o in self.observers])

    def run_ended(self, workflow: str, status: str) -> None:
        for o in self.observers:
            o.run_ended(workflow, status)

    def step(self, component: str, step_id: str) -> Observation:
        return _joined([o.step(component, step_id) for o in self.observers])

    def step_replayed(self, component: str, step_id: str) -> None:
        for o in self.observers:
            o.step_replayed(component, step_id)

    def item_ended(
        self, component: str, step_id: str, seconds: float, error_type: str | None = None
    ) -> None:
        for o in self.observers:
            o.item_ended(component, step_id, seconds, error_type)

    def map(self, component: str, map_id: str, items: int, concurrency: int) -> Observation:
        return _joined([o.map(component, map_id, items, concurrency) for o in self.observers])

    def context(self) -> str | None:
        for o in self.observers:
            found = o.context()
            if found is not None:
                return found
        return None

    def remote(
        self, context: str | None, kind: str, component: str, attributes: Mapping[str, Any]
    ) -> Observation:
        return _joined([o.remote(context, kind, component, attributes) for o in self.observers])

    def absorb(self, carried: Carried) -> None:
        for o in self.observers:
            o.absorb(carried)

    def llm_waited(self, model: str, seconds: float) -> None:
        for o in self.observers:
            o.llm_waited(model, seconds)

    def llm_request(
        self, model: str, operation: str, *, attempt: int, waited: float, step_id: str | None,
        server: tuple[str, int | None] | None,
    ) -> Observation:  # fmt: skip
        return _joined([
            o.llm_request(model, operation, attempt=attempt, waited=waited, step_id=step_id,
                          server=server)
            for o in self.observers
        ])  # fmt: skip

    def llm_rate_limited(self, model: str) -> None:
        for o in self.observers:
            o.llm_rate_limited(model)

    def llm_retry(self, model: str) -> None:
        for o in self.observers:
            o.llm_retry(model)

    def llm_gave_up(self, model: str) -> None:
        for o in self.observers:
            o.llm_gave_up(model)

    def schedule_skipped(self, reason: str) -> None:
        for o in self.observers:
            o.schedule_skipped(reason)

    def stream(self, fmt: str) -> Observation:
        return _joined([o.stream(fmt) for o in self.observers])

    def delivered(self, entry_ids: Iterable[bytes], since_ms: float, fmt: str) -> None:
        ids = list(entry_ids)
        for o in self.observers:
            o.delivered(ids, since_ms, fmt)
