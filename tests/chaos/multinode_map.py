"""Run as a script (it needs a Ray of its own): Component.map on a three-node local cluster.
Every item records the node it ran on and how many items of that node ran at once (in Redis).
Prints one JSON line with what happened."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import ray
from ray.cluster_utils import Cluster

from genx_ray import component, start, workflow
from genx_ray.store import async_redis

TAG = os.urandom(4).hex()
# KEYS: running on the node, the most ever seen running there. Returns the new count.
ENTER = """
local c = redis.call('INCR', KEYS[1])
if c > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], c) end
return c
"""


@component(resources={"llm": 1}, num_cpus=0)
async def probe(x: int) -> str:
    node = ray.get_runtime_context().get_node_id()
    client = async_redis(os.environ["GENX_REDIS_URL"])
    running, peak = f"mm:{TAG}:running:{node}", f"mm:{TAG}:peak:{node}"
    await client.eval(ENTER, 2, running, peak)
    await asyncio.sleep(0.15)
    await client.decr(running)
    await client.aclose()
    if x == 13:
        raise ValueError("thirteen")  # a failed item does not fail the batch
    return node


probe_b = probe.with_resources(resources={"llm": 1}, num_cpus=0, node_labels={"zone": "b"})


@workflow(name="mm-spread")
async def spread(n: int) -> list[Any]:
    out = await probe.map(range(n), concurrency=64)  # more than the cluster's 8 llm slots
    return [o if isinstance(o, str) else "error" for o in out]


@workflow(name="mm-labelled")
async def labelled(n: int) -> list[Any]:
    out = await probe_b.map(range(n), concurrency=64)
    return [o if isinstance(o, str) else "error" for o in out]


def main() -> None:
    os.environ["GENX_REDIS_URL"] = sys.argv[1]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"llm": 2}, "labels": {"zone": "a"}},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"llm": 3}, labels={"zone": "b"})
    ray.init(address=cluster.address, namespace="genx", logging_level="ERROR")
    try:
        zones = {n["NodeID"]: n["Labels"].get("zone") for n in ray.nodes() if n["Alive"]}
        caps = {n["NodeID"]: n["Resources"].get("llm", 0) for n in ray.nodes() if n["Alive"]}
        one = start(spread, {"n": 40}).result(240)
        # Two runs at once on the same nodes: together they stay within each node's capacity.
        both = [start(spread, {"n": 24}), start(spread, {"n": 24})]
        two = [h.result(240) for h in both]
        three = start(labelled, {"n": 20}).result(240)

        async def peaks() -> dict[str, int]:
            client = async_redis(sys.argv[1])
            found = {k.rsplit(":", 1)[1]: int(await client.get(k))
                     async for k in client.scan_iter(f"mm:{TAG}:peak:*")}  # fmt: skip
            await client.aclose()
            return found

        result = {
            "zones": zones, "caps": caps, "one": one, "two": two, "three": three,
            "peaks": asyncio.run(peaks()),
        }  # fmt: skip
        print(json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
