"""Run as a script (it needs a Ray of its own): a multi-node local cluster loses the node that
hosts a run, a replacement node joins, and the run must finish there from its journal.
Prints one JSON line with what happened."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys

import ray
from ray.cluster_utils import Cluster

os.environ["GENX_LEASE_SECONDS"] = "2"
os.environ["GENX_WORKFLOWS"] = "wf_fixtures"
os.environ["GENX_HOST_RESOURCES"] = '{"hostnode": 0.01}'  # run hosts only on "hostnode" nodes

import wf_fixtures  # noqa: F401 - the ticker workflow

from genx_ray.flow import registry
from genx_ray.service import Worker
from genx_ray.store import EventStore, RunStore, async_redis, keys


def _log(msg: str) -> None:
    print(f"node_loss: {msg}", file=sys.stderr, flush=True)


async def scenario(cluster: Cluster, node: object, redis_url: str) -> dict[str, object]:
    client = async_redis(redis_url)
    runs, events = RunStore(client), EventStore(client)
    worker = Worker(client, registry=registry, hosts="ray", redis_url=redis_url, drain_timeout=1)
    serving = asyncio.create_task(worker.serve())
    run = await runs.create("ticker", {"n": 20, "delay": 0.1}, enqueue=True)
    _log(f"created {run.id}")
    while sum(e.event.type == "progress" for e in await events.read(run.id)) < 5:
        assert not (await runs.get(run.id)).status.terminal, await runs.get(run.id)
        await asyncio.sleep(0.05)
    first_host = await client.hget(keys.run(run.id), "host")
    _log(f"running on {first_host}; removing its node")
    cluster.remove_node(node)  # the node's raylet goes (main thread only)...
    with contextlib.suppress(ProcessLookupError):  # ...and, as on a lost machine, its processes
        os.kill(int(str(first_host).rsplit(":", 1)[1]), signal.SIGKILL)
    cluster.add_node(num_cpus=1, resources={"hostnode": 1})
    _log("replacement node added")
    async for _ in events.follow(run.id):
        pass
    done = await runs.get(run.id)
    stored = [e.event for e in await events.read(run.id)]
    worker.stop()
    await serving
    return {
        "status": done.status.value, "attempt": done.attempt, "output": done.output,
        "first_host": first_host, "last_host": await client.hget(keys.run(run.id), "host"),
        "restarted": [e.reason for e in stored if e.type == "run.restarted"],  # type: ignore[union-attr]
        "ticks": [e.data["i"] for e in stored if e.type == "progress"],  # type: ignore[union-attr,index]
        "replayed": sum(1 for e in stored if e.type == "step.completed" and e.replayed),  # type: ignore[union-attr]
    }  # fmt: skip


def main() -> None:
    redis_url = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    node = cluster.add_node(num_cpus=1, resources={"hostnode": 1})
    ray.init(address=cluster.address, namespace="genx", logging_level="ERROR")
    try:
        print(json.dumps(asyncio.run(scenario(cluster, node, redis_url))), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
