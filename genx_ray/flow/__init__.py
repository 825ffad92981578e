"""The flow: the programming model, and how a run's code executes step by step.

Components (:class:`Component`: retry, cache, timeout, placement) and workflows
(:class:`Workflow`, the registry of them); the run a coroutine belongs to and where in it
(:class:`RunContext`, scopes); one call of a step (journaled, replayed, retried), ``map`` over
many items, durable waits (sleep, input, child runs). Placement on a Ray cluster is not here: the
flow asks the :class:`Placement` it is given (see :mod:`genx_ray.compute`).
"""

from genx_ray.flow._batching import (
    BatchCall,
    Batches,
    BatchRound,
    batches,
    cancel_batches,
    key_hash,
    use_batches,
)
from genx_ray.flow._children import ChildRun, outcome_entry
from genx_ray.flow._component import Component, component
from genx_ray.flow._context import (
    RunContext,
    current_batch,
    current_run,
    current_scope,
    current_step,
    in_streaming_step,
    item_scope,
    publish,
    run_scope,
)
from genx_ray.flow._placement import Placement, Settle, placement, use_placement
from genx_ray.flow._retry import NO_RETRY, RetryPolicy
from genx_ray.flow._steps import StepSpec, cache_key, call_direct, item_error
from genx_ray.flow._waits import CHILD_CHECK_SECONDS, Parked, sleep, sleep_until, wait_for_input
from genx_ray.flow._workflow import Registry, Workflow, registry, workflow

__all__ = [
    "CHILD_CHECK_SECONDS",
    "NO_RETRY",
    "BatchCall",
    "BatchRound",
    "Batches",
    "ChildRun",
    "Component",
    "Parked",
    "Placement",
    "Registry",
    "RetryPolicy",
    "RunContext",
    "Settle",
    "StepSpec",
    "Workflow",
    "batches",
    "cache_key",
    "call_direct",
    "cancel_batches",
    "component",
    "current_batch",
    "current_run",
    "current_scope",
    "current_step",
    "in_streaming_step",
    "item_error",
    "item_scope",
    "key_hash",
    "outcome_entry",
    "placement",
    "publish",
    "registry",
    "run_scope",
    "sleep",
    "sleep_until",
    "use_batches",
    "use_placement",
    "wait_for_input",
    "workflow",
]
