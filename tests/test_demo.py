"""The README's main command, end to end: the whole stack, a run through the API, the report."""

from __future__ import annotations

import json
import subprocess
import sys


def test_genx_demo_runs_the_whole_stack(redis_url: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "genx_ray.cli", "demo"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["documents"] == 4 and report["failed"] == 0
    assert report["report"].startswith("4 documents digested.")
    assert "summarize.map" in proc.stderr and "4/4" in proc.stderr  # live batch progress
    assert "1. Ray is a unified framework" in proc.stderr  # the report streamed as it was written
