"""Component.map on a three-node local cluster: items on every node, no node above its cap (even
with two runs mapping at once), node labels respected, failed items in place."""

from __future__ import annotations

from collections import Counter

import pytest

from .conftest import run_script

pytestmark = pytest.mark.timeout(400)


def test_map_spreads_over_nodes_within_their_caps(redis_url: str) -> None:
    out, _ = run_script("multinode_map.py", redis_url, timeout=380)
    zones, caps, peaks = out["zones"], out["caps"], out["peaks"]
    assert sorted(zones.values()) == ["a", "b", "b"]

    one = out["one"]
    assert one[13] == "error" and len(one) == 40  # in place; the rest went on
    per_node = Counter(o for o in one if o != "error")
    assert set(per_node) == set(zones)  # every node ran items
    for run in out["two"]:
        assert run[13] == "error" and set(run) - {"error"} == set(zones)
    # The most items ever running at once on a node: never above its llm capacity (2 or 3),
    # even while two runs mapped on it together; and the capacity was used.
    assert set(peaks) == set(zones)
    for node, peak in peaks.items():
        assert 1 <= peak <= caps[node], (node, peak, caps)
    assert max(peaks.values()) == 3

    three = out["three"]
    assert {zones[o] for o in three if o != "error"} == {"b"}  # only the labelled nodes
