"""The public surface of `genx_ray` (docs/api.md): adding is fine, removing is not."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import genx_ray
from genx_ray.model import InputInvalid

PINNED = [
    "Component", "GenxError", "NonRetryable", "RetryAfter", "RetryPolicy", "RunCancelled",
    "RunFailed", "RunHandle", "StepError", "StepTimeout", "UserError", "Workflow",
    "component", "publish", "registry", "run", "start", "workflow",
    # durable waits
    "wait_for_input", "InputTimeout", "sleep", "sleep_until",
    # what a RunHandle returns, and the errors a user meets first
    "Run", "RunStatus", "ConfigError", "NondeterminismError",
]  # fmt: skip


def test_every_pinned_name_is_still_exported() -> None:
    missing = [name for name in PINNED if name not in genx_ray.__all__]
    assert not missing, f"removed from the public API: {missing}"


def test_all_lists_exactly_what_the_package_exposes() -> None:
    exposed = {
        name for name, value in vars(genx_ray).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }  # fmt: skip
    assert exposed == set(genx_ray.__all__)
    star: dict[str, object] = {}
    exec("from genx_ray import *", star)
    assert set(star) - {"__builtins__"} == set(genx_ray.__all__)


def test_every_public_name_is_documented() -> None:
    undocumented = [
        name for name in genx_ray.__all__ if not (getattr(genx_ray, name).__doc__ or "").strip()
    ]  # fmt: skip
    assert not undocumented


def test_importing_genx_ray_does_not_import_ray() -> None:
    code = "import sys, genx_ray, genx_ray.examples; assert 'ray' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_a_child_priority_is_checked_and_leaves_the_workflow_as_it_was() -> None:
    async def body(x: int) -> int:
        return x

    child = genx_ray.Workflow(body, name="unit-child-priority")  # not registered
    urgent = child.with_priority(1)
    assert urgent.child_priority == 1 and urgent.name == child.name
    assert child.child_priority is None  # the registered workflow is not changed
    for bad in (0, 6, 2.5, True):
        with pytest.raises(InputInvalid, match="priority"):
            child.with_priority(bad)  # type: ignore[arg-type]
