"""genx-ray: durable, resumable LLM and agent workflows on Ray.

Importing this package never imports Ray: the gateway depends on it and must stay Ray-free.
"""

__version__ = "0.2.0"  # the one place: pyproject.toml and the API read it from here

from genx_ray import redaction
from genx_ray.children import ChildRun
from genx_ray.component import Component, component
from genx_ray.context import publish
from genx_ray.errors import (
    ChildFailed,
    GenxError,
    InputTimeout,
    NonRetryable,
    RetryAfter,
    RunCancelled,
    RunFailed,
    StepError,
    StepTimeout,
    UserError,
)
from genx_ray.local import RunHandle, run, start
from genx_ray.retry import RetryPolicy
from genx_ray.waits import sleep, sleep_until, wait_for_input
from genx_ray.workflow import Workflow, registry, workflow

redaction.install()  # every process that runs genx-ray masks secrets in its log records

__all__ = [
    "ChildFailed",
    "ChildRun",
    "Component",
    "GenxError",
    "InputTimeout",
    "NonRetryable",
    "RetryAfter",
    "RetryPolicy",
    "RunCancelled",
    "RunFailed",
    "RunHandle",
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
