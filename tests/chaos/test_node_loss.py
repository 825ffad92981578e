"""A node removed from a multi-node local cluster takes its run host along; the run finishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]
HERE = os.path.dirname(__file__)
TESTS = os.path.dirname(HERE)


def test_losing_the_node_of_a_run_host(redis_url: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "node_loss.py"), redis_url],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "succeeded" and out["output"] == sum(range(20))
    assert out["attempt"] == 2 and out["first_host"] != out["last_host"], (out, proc.stderr[-2000:])
    assert len(out["restarted"]) == 1 and "stopped heartbeating" in out["restarted"][0]
    assert sorted(set(out["ticks"])) == list(range(20)) and len(out["ticks"]) <= 21
    assert out["replayed"] >= 4  # the steps finished on the lost node were not run again
