"""genx-ray: durable, resumable LLM and agent workflows on Ray.

The public face, all of it in :data:`__all__`:

- build: :func:`component` (:class:`Component`), :func:`workflow` (:class:`Workflow`),
  :class:`RetryPolicy`, :func:`publish`; durable waits :func:`sleep`, :func:`sleep_until`,
  :func:`wait_for_input`, child runs (:class:`ChildRun`);
- run from a script or notebook: :func:`run`, :func:`start` (a :class:`RunHandle`, whose
  ``get()`` is a :class:`Run` with a :class:`RunStatus`);
- errors: :class:`GenxError` at the root; :class:`UserError` (misuse: :class:`ConfigError`,
  :class:`NondeterminismError`) kept apart from runtime failures (:class:`StepError`,
  :class:`StepTimeout`, :class:`InputTimeout`, :class:`ChildFailed`, :class:`RunFailed`,
  :class:`RunCancelled`); signals a component raises to steer its retries
  (:class:`RetryAfter`, :class:`NonRetryable`).

Elsewhere, public too: :mod:`genx_ray.llm` (the openai SDK with cluster-wide limits),
:mod:`genx_ray.explore` (runs as data frames), :mod:`genx_ray.client` (the HTTP API's client),
:mod:`genx_ray.model` (events and the run record, as the API and the CLI show them). Every other
module is internal (its name starts with ``_``): see docs/architecture.md.

Importing this package never imports Ray: the gateway depends on it and must stay Ray-free.
"""

__version__ = "0.2.0"  # the one place: pyproject.toml and the API read it from here

from typing import TYPE_CHECKING as _TYPE_CHECKING

from genx_ray.flow import (
    ChildRun,
    Component,
    RetryPolicy,
    Workflow,
    component,
    publish,
    registry,
    sleep,
    sleep_until,
    wait_for_input,
    workflow,
)
from genx_ray.model import (
    ChildFailed,
    Concurrency,
    ConfigError,
    GenxError,
    InputTimeout,
    NondeterminismError,
    NonRetryable,
    RetryAfter,
    Run,
    RunCancelled,
    RunFailed,
    RunStatus,
    StepError,
    StepTimeout,
    UserError,
)
from genx_ray.service import RunHandle, run, start

if _TYPE_CHECKING:
    from genx_ray.flow import Batches as _Batches


def _compose() -> None:
    """Wire the rooms together, once per process."""
    from genx_ray.compute import RayPlacement
    from genx_ray.flow import use_batches, use_placement
    from genx_ray.observe import install_log_masking

    use_placement(RayPlacement())  # placed work runs on Ray: the flow is given it
    use_batches(_provider_batches)  # map(llm="batch") goes through the openai SDK (on first use)
    install_log_masking()  # every process that runs genx-ray masks secrets in its log records


def _provider_batches() -> "_Batches":
    from genx_ray.llm import ProviderBatches

    return ProviderBatches()


_compose()

__all__ = [
    "ChildFailed",
    "ChildRun",
    "Component",
    "Concurrency",
    "ConfigError",
    "GenxError",
    "InputTimeout",
    "NonRetryable",
    "NondeterminismError",
    "RetryAfter",
    "RetryPolicy",
    "Run",
    "RunCancelled",
    "RunFailed",
    "RunHandle",
    "RunStatus",
    "StepError",
    "StepTimeout",
    "UserError",
    "Workflow",
    "component",
    "publish",
    "registry",
    "run",
    "sleep",
    "sleep_until",
    "start",
    "wait_for_input",
    "workflow",
]
