"""The public surface of `genx_ray` (CONTRACT.md section 1): adding is fine, removing is not."""

from __future__ import annotations

import subprocess
import sys

import genx_ray


def test_public_names_are_pinned() -> None:
    assert sorted(genx_ray.__all__) == [
        "Component", "GenxError", "NonRetryable", "RetryAfter", "RetryPolicy", "RunCancelled",
        "RunFailed", "RunHandle", "StepError", "StepTimeout", "UserError", "Workflow",
        "component", "publish", "registry", "run", "start", "workflow",
    ]  # fmt: skip
    for name in genx_ray.__all__:
        assert getattr(genx_ray, name) is not None


def test_importing_genx_ray_does_not_import_ray() -> None:
    code = "import sys, genx_ray, genx_ray.examples; assert 'ray' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
