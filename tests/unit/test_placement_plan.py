"""How a placed component's map concurrency is spread over the nodes (pool.plan), from a list of
nodes shaped like ``ray.nodes()``."""

from __future__ import annotations

from typing import Any

import pytest

from genx_ray.compute import actors_per_node, plan
from genx_ray.flow import StepSpec
from genx_ray.model import UserError


def _node(node_id: str, alive: bool = True, labels: dict[str, str] | None = None,
          **resources: float) -> dict[str, Any]:  # fmt: skip
    return {"NodeID": node_id, "Alive": alive, "Labels": labels or {}, "Resources": resources}


def _spec(**placement: Any) -> StepSpec:
    async def item(x: int) -> int:
        return x

    return StepSpec(fn=item, name="item", **placement)


def test_concurrency_is_spread_evenly_over_the_nodes() -> None:
    nodes = [_node("a", CPU=4), _node("b", CPU=4), _node("c", CPU=4)]
    got = plan(_spec(remote=True), 10, nodes)
    assert {n: s for n, (s, _) in got.items()} == {"a": 4, "b": 3, "c": 3}


def test_no_node_gets_more_than_its_resources_allow() -> None:
    nodes = [_node("a", CPU=2, llm=8), _node("b", CPU=2, llm=2), _node("c", CPU=2)]
    got = plan(_spec(resources={"llm": 1}), 64, nodes)
    assert {n: s for n, (s, _) in got.items()} == {"a": 8, "b": 2}  # c offers no "llm"
    cpu = plan(_spec(num_cpus=0.5), 64, nodes)
    assert {n: s for n, (s, _) in cpu.items()} == {"a": 4, "b": 4, "c": 4}


def test_dead_nodes_and_nodes_without_the_labels_get_nothing() -> None:
    nodes = [
        _node("a", CPU=2, labels={"zone": "eu"}),
        _node("b", alive=False, CPU=2, labels={"zone": "eu"}),
        _node("c", CPU=2, labels={"zone": "us"}),
    ]
    got = plan(_spec(node_labels={"zone": "eu"}), 5, nodes)
    assert {n: s for n, (s, _) in got.items()} == {"a": 5}


def test_no_node_that_can_run_it_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="no alive node offers"):
        plan(_spec(resources={"gpu": 1}), 4, [_node("a", CPU=2)])


def test_actors_per_node_follow_its_cpus_up_to_four() -> None:
    assert [actors_per_node({"CPU": c}) for c in (0, 1, 2, 3, 16)] == [1, 1, 2, 3, 4]
