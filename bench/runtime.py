"""Overhead of a component call: inline and as a Ray task, against a bare coroutine call and a
bare Ray task, in the same process and run."""

from __future__ import annotations

import asyncio
import os

from bench.report import row, timed
from genx_ray import component, start, workflow
from genx_ray.compute import ensure_ray
from genx_ray.store import resolve_redis_url

N_INLINE = 2000
N_RAY = 200


async def _bare(x: int) -> int:
    return x


noop = component(_bare)
remote_noop = component(remote=True, num_cpus=0)(_bare)


@workflow(name="bench-sequential")
async def sequential(n: int) -> int:
    for i in range(n):
        await noop(i)
    return n


@workflow(name="bench-concurrent")
async def concurrent(n: int) -> int:
    await asyncio.gather(*(noop(i) for i in range(n)))
    return n


@workflow(name="bench-remote")
async def remote_sequential(n: int) -> int:
    for i in range(n):
        await remote_noop(i)
    return n


def main() -> None:
    redis_url = resolve_redis_url()
    os.environ["GENX_REDIS_URL"] = redis_url

    async def bare_loop() -> None:
        for i in range(N_INLINE):
            await _bare(i)

    async def direct_loop() -> None:
        for i in range(N_INLINE):
            await noop(i)

    bare = timed(lambda: asyncio.run(bare_loop())) / N_INLINE
    row("bare coroutine call", bare)
    row(
        "component called outside a run", timed(lambda: asyncio.run(direct_loop())) / N_INLINE, bare
    )
    start(sequential, {"n": 10}).result(60)  # warm up: Redis connection, scripts loaded
    seq = timed(lambda: start(sequential, {"n": N_INLINE}).result(300)) / N_INLINE
    row("step in a run, sequential (journal + events, awaited)", seq, bare)
    con = timed(lambda: start(concurrent, {"n": N_INLINE}).result(300)) / N_INLINE
    row("step in a run, 2000 gathered (group commit)", con, bare)

    import ray

    ensure_ray(redis_url=redis_url)

    @ray.remote(num_cpus=0)
    def bare_task(x: int) -> int:
        return x

    ray.get([bare_task.remote(i) for i in range(20)])  # warm the worker pool
    bare_ray = timed(lambda: [ray.get(bare_task.remote(i)) for i in range(N_RAY)]) / N_RAY
    row("bare Ray task, sequential", bare_ray, unit="ms")
    start(remote_sequential, {"n": 5}).result(120)
    comp_ray = timed(lambda: start(remote_sequential, {"n": N_RAY}).result(300)) / N_RAY
    row("Ray-task component step in a run, sequential", comp_ray, bare_ray, unit="ms")


if __name__ == "__main__":
    main()
