"""Running one attempt of a component as a Ray task.

Only components that ask for placement (``resources``, ``num_cpus``, ``node_labels``) or for
``remote=True`` go here: a Ray task round trip costs ~1.6 ms and a process, the wrong grain for
a single LLM call (those stay inline or go to async actor pools). Retries, the journal and events
stay in the run host; the task runs the bare function once, under a span whose parent is its
step's (the context goes with the call), and brings back what it recorded for metrics.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from genx_ray.observe import Carried, setup
from genx_ray.observe import observer as current_observer

if TYPE_CHECKING:
    from genx_ray.flow import StepSpec

log = logging.getLogger("genx_ray.remote")

# One Ray remote function per component function: Ray exports its code once, not per call.
_remote_fns: dict[Callable[..., Any], Any] = {}


def _trampoline(
    fn: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
    trace: str | None,
) -> tuple[Any, Carried]:  # fmt: skip
    """In the task's process: the function's value, and what it recorded (carried back)."""
    with setup("task").remote(trace, "task", name, {}) as observed:
        try:
            value = _call(fn, args, kwargs)
        except Exception as exc:
            observed.failed(exc)
            raise
    return value, observed.carried


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if inspect.isasyncgenfunction(fn):

        async def collect() -> list[Any]:
            return [chunk async for chunk in fn(*args, **kwargs)]

        return asyncio.run(collect())
    if inspect.iscoroutinefunction(fn):
        return asyncio.run(fn(*args, **kwargs))
    return fn(*args, **kwargs)


# A cancelled task still running this long after its cancel (stuck in C code, or the cancel was
# lost) has its worker process killed: the work must stop, not merely its result be ignored.
CANCEL_GRACE_SECONDS = 5.0
_stopping: set[asyncio.Task[None]] = set()


async def _force_after(ref: Any, grace: float) -> None:
    import ray

    try:
        await asyncio.wait_for(asyncio.wrap_future(ref.future()), grace)
    except TimeoutError:
        log.warning("a cancelled Ray task still ran after %.0f s: killing its worker", grace)
        ray.cancel(ref, force=True)
    except Exception:  # it ended (cancelled, failed): nothing more to do
        pass


async def run_as_task(spec: StepSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    import ray

    from genx_ray.compute._bootstrap import ensure_ray

    ensure_ray(redis_url=os.environ.get("GENX_REDIS_URL"))
    remote_fn = _remote_fns.get(spec.fn)
    if remote_fn is None:
        fn, name = spec.fn, spec.name

        def call(
            args: tuple[Any, ...], kwargs: dict[str, Any], trace: str | None = None
        ) -> tuple[Any, Carried]:
            return _trampoline(fn, name, args, kwargs, trace)

        call.__name__ = call.__qualname__ = spec.name
        remote_fn = _remote_fns[spec.fn] = ray.remote(max_retries=0)(call)
    options: dict[str, Any] = {"name": spec.name}
    if spec.num_cpus is not None:
        options["num_cpus"] = spec.num_cpus
    if spec.resources:
        options["resources"] = dict(spec.resources)
    if spec.node_labels:
        options["label_selector"] = dict(spec.node_labels)
    observer = current_observer()
    ref = remote_fn.options(**options).remote(args, dict(kwargs), observer.context())
    try:
        value, recorded = await ref
        observer.absorb(recorded)
        return value
    except asyncio.CancelledError:  # timeout or run cancelled: stop the task too
        ray.cancel(ref)  # an exception raised in the task, between two of its bytecodes
        stopping = asyncio.get_running_loop().create_task(_force_after(ref, CANCEL_GRACE_SECONDS))
        _stopping.add(stopping)
        stopping.add_done_callback(_stopping.discard)
        raise
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        raise cause from None
