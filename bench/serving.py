"""Serving many runs at once, through the whole stack: HTTP clients -> gateway -> Redis -> worker
-> run hosts (each executing many runs), every figure beside its ideal or baseline:

1. warm: one one-step run at a time, POST (?wait) -> run.succeeded;
2. burst: 2,000 three-step runs (50 ms a step) POSTed by 32 concurrent clients: runs/s from the
   first POST to the last run.succeeded, queued -> started p50/p99 (from the run records);
   beside plain asyncio running the same 2,000 x 3 sleeps;
3. held: 2,000 runs waiting in a 60 s step, all at once: memory in use per waiting run, and
   ``GET /v1/runs/{id}`` p99 meanwhile;
4. the same burst (smaller) with one process per run (``GENX_HOST_RUNS=1``), as before hosts
   were multiplexed.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

from bench.stack import bench_env, memory_in_use_mb, pct, processes, stack
from bench.wire import Connection
from genx_ray import component, workflow
from genx_ray.store import async_redis, keys, resolve_redis_url

BURST = 2000
HELD = 2000
CLIENTS = 32
STEP_SECONDS = 0.05


@component
async def pause(i: int) -> int:
    await asyncio.sleep(STEP_SECONDS)
    return i


@workflow(name="serve-three")
async def three() -> int:
    return await pause(0) + await pause(1) + await pause(2)


@component
async def nothing() -> int:
    return 1


@workflow(name="serve-one")
async def one() -> int:
    return await nothing()


@component
async def hold(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@workflow(name="serve-hold")
async def held(seconds: float = 60.0) -> float:
    return await hold(seconds)


async def _post_all(base: str, workflow: str, n: int, body: Any) -> list[str]:
    """POST n runs from CLIENTS concurrent clients (a connection each); their ids."""
    ids: list[str] = []
    left = iter(range(n))

    async def client() -> None:
        conn = Connection(base)
        for _ in left:
            status, run = await conn.request("POST", f"/v1/workflows/{workflow}/runs",
                                             {"input": body})  # fmt: skip
            assert status == 202, run
            ids.append(run["id"])
        await conn.close()

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return ids


async def _fields(redis: Any, ids: list[str], *names: str) -> list[list[Any]]:
    async with redis.pipeline(transaction=False) as pipe:
        for run_id in ids:
            pipe.hmget(keys.run(run_id), *names)
        return list(await pipe.execute())


async def _until_all(redis: Any, ids: list[str], statuses: set[str], within: float) -> None:
    """Until every run has one of ``statuses`` (looking only at those that had not yet)."""
    deadline = time.monotonic() + within
    left = list(ids)
    while left:
        got = await _fields(redis, left, "status")
        left = [r for r, (s,) in zip(left, got, strict=True) if s not in statuses]
        assert time.monotonic() < deadline, len(left)
        await asyncio.sleep(0.25)


async def warm(base: str) -> list[float]:
    conn, out = Connection(base), []
    for _ in range(40):
        t0 = time.perf_counter()
        status, run = await conn.request("POST", "/v1/workflows/serve-one/runs?wait=10", {})
        out.append(time.perf_counter() - t0)
        assert status == 200 and run["status"] == "succeeded", run
    await conn.close()
    return out[10:]  # the first ones warm the processes up


async def burst(base: str, redis: Any, n: int) -> dict[str, float]:
    t0 = time.time()
    ids = await _post_all(base, "serve-three", n, {})
    posted = time.time() - t0
    await _until_all(redis, ids, {"succeeded", "failed", "cancelled"}, within=600)
    rows = await _fields(redis, ids, "status", "created_at", "started_at", "finished_at")
    assert all(r[0] == "succeeded" for r in rows), {r[0] for r in rows}
    waits = [float(r[2]) - float(r[1]) for r in rows]
    last = max(float(r[3]) for r in rows)
    return {"rate": n / (last - t0), "p50": pct(waits, 50), "p99": pct(waits, 99),
            "posted": n / posted}  # fmt: skip


async def plain_burst(n: int) -> float:
    """The same n runs as plain asyncio tasks: 3 sleeps each, all at once."""

    async def run() -> None:
        for _ in range(3):
            await asyncio.sleep(STEP_SECONDS)

    t0 = time.perf_counter()
    await asyncio.gather(*(run() for _ in range(n)))
    return n / (time.perf_counter() - t0)


async def hold_many(base: str, redis: Any, n: int) -> dict[str, float]:
    before = memory_in_use_mb()
    hosts_before = len(processes("ray::RunHost"))
    ids = await _post_all(base, "serve-hold", n, {"seconds": 60})
    await _until_all(redis, ids, {"running"}, within=120)
    await asyncio.sleep(2)  # let allocations settle
    grown = memory_in_use_mb() - before
    latencies = []
    picks = iter(random.choices(ids, k=1000))

    async def getter() -> None:
        conn = Connection(base)
        for run_id in picks:
            t0 = time.perf_counter()
            status, run = await conn.request("GET", f"/v1/runs/{run_id}")
            latencies.append(time.perf_counter() - t0)
            assert status == 200 and run["status"] == "running"
        await conn.close()

    await asyncio.gather(*(getter() for _ in range(8)))
    statuses = await _fields(redis, ids, "status")
    hosts = len(processes("ray::RunHost"))

    async def cancel(chunk: list[str]) -> None:
        conn = Connection(base)
        for run_id in chunk:
            await conn.request("POST", f"/v1/runs/{run_id}/cancel")
        await conn.close()

    await asyncio.gather(*(cancel(ids[i::CLIENTS]) for i in range(CLIENTS)))
    await _until_all(redis, ids, {"cancelled"}, within=120)
    return {
        "running": sum(s == "running" for (s,) in statuses), "per_run_mb": grown / n,
        "grown_mb": grown, "hosts": hosts - hosts_before, "get_p50": pct(latencies, 50),
        "get_p99": pct(latencies, 99),
    }  # fmt: skip


async def measure(base: str, redis_url: str, *, full: bool) -> dict[str, Any]:
    redis = async_redis(redis_url)
    out: dict[str, Any] = {"warm": await warm(base)}
    await burst(base, redis, 100)  # the hosts and connections warm up
    out["burst"] = await burst(base, redis, BURST if full else 200)
    if full:
        out["held"] = await hold_many(base, redis, HELD)
    await redis.aclose()
    return out


def main() -> None:
    redis_url = resolve_redis_url()
    env = bench_env(redis_url, "bench.serving")
    ms = 1e3
    with stack(env) as (base, _):
        ours = asyncio.run(measure(base, redis_url, full=True))
    plain = asyncio.run(plain_burst(BURST))
    w, b, h = ours["warm"], ours["burst"], ours["held"]
    print(
        f"  warm one-step run, POST -> run.succeeded (sequential, 30): p50"
        f" {statistics.median(w) * ms:6.1f} ms, p99 {pct(w, 99) * ms:6.1f} ms   (goal <= 30 ms)"
    )
    print(
        f"  burst of {BURST} three-step runs ({STEP_SECONDS * 1e3:.0f} ms steps),"
        f" {CLIENTS} clients:"
    )
    print(f"    first POST -> last run.succeeded   {b['rate']:7.1f} runs/s   (goal >= 150;"
          f" plain asyncio, same sleeps: {plain:,.0f} runs/s; the gateway took POSTs at"
          f" {b['posted']:.0f}/s)")  # fmt: skip
    print(
        f"    queued -> started                   p50 {b['p50'] * ms:6.1f} ms   p99"
        f" {b['p99'] * ms:7.1f} ms   (goal p50 <= 20, p99 <= 250)"
    )
    print(f"  {HELD} runs waiting at once (a 60 s step): {h['running']} running together;"
          f" memory in use +{h['grown_mb']:.0f} MB = {h['per_run_mb']:.2f} MB per run"
          f" ({h['hosts']} more host processes)   (goal <= 0.5)")  # fmt: skip
    print(
        f"    GET /v1/runs/{{id}} meanwhile, 8 clients: p50 {h['get_p50'] * ms:5.1f} ms,"
        f" p99 {h['get_p99'] * ms:5.1f} ms   (goal p99 <= 50)"
    )

    # One process per run, as before hosts took many runs: the same burst, smaller.
    alone = bench_env(redis_url, "bench.serving", GENX_HOST_RUNS="1")
    with stack(alone, worker_args=("--max-runs", "32")) as (base, _):
        one = asyncio.run(measure(base, redis_url, full=False))
    b1 = one["burst"]
    print(f"  one process per run (GENX_HOST_RUNS=1, --max-runs 32), 200 runs: {b1['rate']:.1f}"
          f" runs/s, queued -> started p50 {b1['p50'] * ms:.0f} ms, p99 {b1['p99'] * ms:.0f} ms;"
          f" warm one-step p50 {statistics.median(one['warm']) * ms:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
