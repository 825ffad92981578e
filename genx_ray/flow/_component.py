"""Components: reusable, idempotent steps with retry, cache, timeout and placement.

Calling a component inside a run makes it a *step*: it gets a deterministic id (parent step,
position among its siblings, component name), its outcome is journaled in Redis, and a restarted
run gets the recorded outcome back without running it again. Outside any run, a component is
just the function with its retry and timeout: independently testable.

:class:`Component` is the handle users hold; what it is lives in a
:class:`~genx_ray.flow._steps.StepSpec`, and how a call runs in :mod:`genx_ray.flow._steps` (one
call) and :mod:`genx_ray.flow._mapping` (``map``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, Literal, ParamSpec, TypeVar, overload

from genx_ray.flow._context import current_run, current_scope
from genx_ray.flow._mapping import map_component
from genx_ray.flow._retry import NO_RETRY, RetryPolicy
from genx_ray.flow._steps import CacheScope, StepSpec, call_direct, call_step
from genx_ray.model import Codec, StepError, UserError

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _check_name(name: str) -> str:
    if not name or any(c in name for c in "/:@{} \n"):
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
        cache_scope: CacheScope = "tenant",
        timeout: float | None = None,
        num_cpus: float | None = None,
        resources: Mapping[str, float] | None = None,
        node_labels: Mapping[str, str] | None = None,
        remote: bool = False,
    ) -> None:
        if not callable(fn):
            raise UserError(f"@component needs a function, got {fn!r}")
        if cache_scope not in ("tenant", "global"):
            raise UserError(f"cache_scope must be 'tenant' or 'global', not {cache_scope!r}")
        self.spec = StepSpec(
            fn=fn, name=_check_name(name or fn.__name__), retry=retry, cache_ttl=cache_ttl,
            cache_version=cache_version, cache_scope=cache_scope, timeout=timeout,
            num_cpus=num_cpus,
            resources=dict(resources or {}), node_labels=dict(node_labels or {}), remote=remote,
        )  # fmt: skip
        functools.update_wrapper(self, fn)

    @classmethod
    def _of(cls, spec: StepSpec) -> Component[P, R]:
        new: Component[P, R] = cls.__new__(cls)
        functools.update_wrapper(new, spec.fn)
        new.spec = spec
        return new

    # -- what it is ------------------------------------------------------------------------------

    @property
    def fn(self) -> Callable[..., Any]:
        return self.spec.fn

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def retry(self) -> RetryPolicy:
        return self.spec.retry

    @property
    def cache_ttl(self) -> float | None:
        return self.spec.cache_ttl

    @property
    def timeout(self) -> float | None:
        return self.spec.timeout

    @property
    def num_cpus(self) -> float | None:
        return self.spec.num_cpus

    @property
    def resources(self) -> Mapping[str, float]:
        return self.spec.resources

    @property
    def node_labels(self) -> Mapping[str, str]:
        return self.spec.node_labels

    @property
    def remote(self) -> bool:
        """Whether each attempt runs as a Ray task (and a map goes to the map actors)."""
        return self.spec.placed

    @property
    def codec(self) -> Codec:
        return self.spec.codec

    def __repr__(self) -> str:
        return f"<component {self.name}>"

    # -- configuration: each returns a new component, the original is untouched ----------------

    def with_retry(self, policy: RetryPolicy | None = None, **fields: Any) -> Component[P, R]:
        """``with_retry(max_attempts=4)`` changes fields of the current policy."""
        return self._of(
            self.spec.replace(retry=dataclasses.replace(policy or self.retry, **fields))
        )

    def with_cache(
        self, ttl: float | None, *, version: str | None = None, scope: CacheScope | None = None
    ) -> Component[P, R]:
        """Cache results in Redis for ``ttl`` seconds (None: no cache). Bump ``version`` when the
        code changes what it returns for the same input. ``scope``: ``"tenant"`` (the default)
        keeps each tenant's results apart; ``"global"`` shares them between tenants, an opt-in
        for results that depend on the arguments alone (a hit tells a tenant that another
        asked the same)."""
        if scope is not None and scope not in ("tenant", "global"):
            raise UserError(f"cache scope must be 'tenant' or 'global', not {scope!r}")
        return self._of(
            self.spec.replace(
                cache_ttl=ttl, cache_version=version or self.spec.cache_version,
                cache_scope=scope or self.spec.cache_scope,
            )
        )  # fmt: skip

    @property
    def cache_scope(self) -> CacheScope:
        return self.spec.cache_scope

    def with_timeout(self, seconds: float | None) -> Component[P, R]:
        return self._of(self.spec.replace(timeout=seconds))

    def with_resources(
        self,
        *,
        num_cpus: float | None = None,
        resources: Mapping[str, float] | None = None,
        node_labels: Mapping[str, str] | None = None,
    ) -> Component[P, R]:
        """Run each attempt as a Ray task placed by these requirements."""
        return self._of(
            self.spec.replace(
                num_cpus=num_cpus, resources=dict(resources or {}),
                node_labels=dict(node_labels or {}),
            )
        )  # fmt: skip

    def with_name(self, name: str) -> Component[P, R]:
        return self._of(self.spec.replace(name=_check_name(name)))

    # -- calling --------------------------------------------------------------------------------

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        ctx = current_run()
        scope = current_scope()
        if ctx is None or scope is None:
            return call_direct(self.spec, args, kwargs)
        # The position is taken now, at call time, so it follows program order even when the
        # coroutines are scheduled by gather in another order.
        return call_step(self.spec, ctx, scope.next_step_id(self.name), args, kwargs)

    async def map(
        self,
        items: Iterable[Any],
        *,
        concurrency: int | None = None,
        fail_fast: bool = False,
        spread: bool | None = None,
        llm: Literal["online", "batch"] = "online",
        completion_window: str = "24h",
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
        maps over the Ray cluster: its items go in chunks to the map actors of its nodes,
        ``concurrency`` spread over the nodes within what each node's resources allow
        (see :mod:`genx_ray.compute._map_actors`). Any other component maps on the run's own
        event loop.

        ``llm="batch"`` (in a run) sends the items' LLM calls (through :mod:`genx_ray.llm`)
        through the provider's Batch API, at its batch price, in rounds: every item runs until
        it ends or makes a call; the round's calls go as one batch (``completion_window``), and
        the run waits holding no host until the batch is done; then the items carry on with
        their answers, a second call going in the next round. A failed request fails its call
        (the component's retry policy retries the item in the next round). Each batch is
        created once and each answer journaled, whatever restarts the run. See
        :mod:`genx_ray.flow._batching`.
        """
        return await map_component(
            self.spec, items, concurrency=concurrency, fail_fast=fail_fast, spread=spread,
            llm=llm, completion_window=completion_window,
        )  # fmt: skip


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
    cache_scope: CacheScope = "tenant",
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
