"""Run hosts: start latency and throughput of one-step runs through the queue and a worker, and
memory per idle host, against a bare detached Ray actor in the same cluster and run."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

from genx_ray import component, workflow
from genx_ray.cluster import ensure_ray
from genx_ray.connections import async_redis, resolve_redis_url
from genx_ray.host import start_host
from genx_ray.runs import RunStore
from genx_ray.streams import EventStore
from genx_ray.worker import Worker
from genx_ray.workflow import Registry

N_RUNS = 30
N_IDLE = 8


@component
async def one(x: int) -> int:
    return x


async def _one_step(x: int) -> int:
    return await one(x)


ONE_STEP = Registry(workflow(name="bench-one-step", registry=Registry())(_one_step))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class _Bare:
    def pid(self) -> int:
        return os.getpid()

    async def run(self, x: int) -> int:
        return x


async def _bare_actor_latency(ray: Any) -> list[float]:
    bare = ray.remote(num_cpus=0)(_Bare)
    out = []
    for i in range(10):
        t0 = time.perf_counter()
        actor = bare.options(
            lifetime="detached", name=f"bench-bare-{i}-{time.monotonic_ns()}"
        ).remote()
        await actor.run.remote(i)
        out.append(time.perf_counter() - t0)
        ray.kill(actor)
    return out


async def _runs_through_worker(redis_url: str, hosts: str) -> tuple[list[float], float]:
    client = async_redis(redis_url)
    runs, events = RunStore(client), EventStore(client)
    worker = Worker(client, registry=ONE_STEP, hosts=hosts, redis_url=redis_url, max_runs=8)
    serving = asyncio.create_task(worker.serve())
    latencies = []
    await asyncio.sleep(3)  # the worker's warm hosts boot
    for i in range(5):  # start latency (create -> run.started), runs 3 s apart as a UI's would be
        await asyncio.sleep(3)
        t0 = time.perf_counter()
        run = await runs.create("bench-one-step", {"x": i}, enqueue=True)
        async for entry in events.follow(run.id):
            if entry.event.type == "run.started":
                latencies.append(time.perf_counter() - t0)
        # (follow runs to the end, so runs do not overlap)
    t0 = time.perf_counter()
    ids = [(await runs.create("bench-one-step", {"x": i}, enqueue=True)).id for i in range(N_RUNS)]
    for run_id in ids:
        async for _ in events.follow(run_id):
            pass
    rate = N_RUNS / (time.perf_counter() - t0)
    worker.stop()
    await serving
    await client.aclose()
    return latencies, rate


def main() -> None:
    import ray

    redis_url = resolve_redis_url()
    os.environ["GENX_REDIS_URL"] = redis_url
    os.environ["GENX_WORKFLOWS"] = "bench.hosts"
    ensure_ray(redis_url=redis_url)
    bare = asyncio.run(_bare_actor_latency(ray))
    print(
        f"  bare detached actor: create + first call  p50 {statistics.median(bare) * 1e3:8.1f} ms"
    )
    for hosts in ("ray", "inline"):
        lat, rate = asyncio.run(_runs_through_worker(redis_url, hosts))
        print(
            f"  one-step run, hosts={hosts:<6} queued -> run.started (3 s apart)  p50"
            f" {statistics.median(lat) * 1e3:8.1f} ms;  {rate:6.1f} runs/s"
            f" ({N_RUNS} runs, 8 at once)"
        )
    idle_bare = [
        ray.remote(num_cpus=0)(_Bare).options(lifetime="detached").remote() for _ in range(N_IDLE)
    ]
    idle_hosts = [start_host(redis_url) for _ in range(N_IDLE)]
    bare_mb = statistics.median(_rss_mb(ray.get(a.pid.remote())) for a in idle_bare)
    host_mb = statistics.median(_rss_mb(ray.get(h.pid.remote())) for h in idle_hosts)
    print(
        f"  memory per idle actor (RSS, median of {N_IDLE}): bare {bare_mb:.0f} MB,"
        f" run host {host_mb:.0f} MB (x{host_mb / bare_mb:.2f})"
    )
    for a in idle_bare + idle_hosts:
        ray.kill(a)


if __name__ == "__main__":
    main()
