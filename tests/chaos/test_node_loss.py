"""A node removed from a multi-node local cluster takes its run host along; the run finishes."""

from __future__ import annotations

import pytest

from .conftest import run_script

pytestmark = pytest.mark.timeout(300)


def test_losing_the_node_of_a_run_host(redis_url: str) -> None:
    out, stderr = run_script("node_loss.py", redis_url, timeout=300)
    assert out["status"] == "succeeded" and out["output"] == sum(range(20))
    assert out["attempt"] == 2 and out["first_host"] != out["last_host"], (out, stderr[-2000:])
    # Ray reports the host dead (its worker restarts the run at once), or, if the node's loss
    # is slower to show, its lease runs out: either way one restart, with the reason.
    (reason,) = out["restarted"]
    assert "died" in reason or "stopped heartbeating" in reason, reason
    assert sorted(set(out["ticks"])) == list(range(20)) and len(out["ticks"]) <= 21
    assert out["replayed"] >= 4  # the steps finished on the lost node were not run again
