"""Batch LLM calls through the whole stack, against plain asyncio in the same run.

Runs are submitted through the gateway (HTTP), taken by a worker, executed by a run host on Ray;
their items go through genx_ray.llm to the LLM simulator (its own process). Each figure is the
median of 3, interleaved with plain asyncio + the openai SDK + a semaphore (one process, the same
simulator), beside the ideal (calls / cap x latency):

1. 1000 calls x 100 ms, cap 64; 2. 640 calls x 1 s, cap 64; 3. 10,000 calls x 100 ms, cap 256,
   with every process's peak memory at 1,000 and at 10,000 calls; 4. 10,000 items with
   ``map(llm="batch")`` (the provider's Batch API, the simulator's batch 3 s in progress) beside
   the same map online: rounds, requests per file, wall time, CPU per item.

For each: the map a user writes first (an unplaced ``@component``: a large map of it goes to the
map actors when there is a Ray cluster, see genx_ray.flow._mapping), the same forced onto the
run's own event loop (``spread=False``), and a placed component (``remote=True``). Then cheap
items (no LLM) at 10k and 100k, with the peak memory of every process.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from typing import Any

import httpx
import openai

from bench.stack import (
    bench_env,
    busy_seconds,
    cpu_seconds,
    peak_mb,
    processes,
    simulator,
    stack,
)
from genx_ray import component, workflow
from genx_ray.client import Client
from genx_ray.store import free_port, resolve_redis_url

# Two budgets, by model: the scenario picks its cap by the model it calls.
LIMITS = {"gpt-4o-mini": {"concurrency": 64}, "gpt-4o": {"concurrency": 256}}
CAPS = {"gpt-4o-mini": 64, "gpt-4o": 256}


async def _ask(model: str, i: int) -> str | None:
    from genx_ray.llm import AsyncOpenAI

    r = await AsyncOpenAI().chat.completions.create(  # a client per call costs nothing
        model=model, messages=[{"role": "user", "content": str(i)}]
    )
    return r.choices[0].message.content


@component
async def ask(q: dict[str, Any]) -> str | None:
    """The component a user writes first: unplaced."""
    return await _ask(q["model"], q["i"])


@component(remote=True)
async def ask_placed(q: dict[str, Any]) -> str | None:
    return await _ask(q["model"], q["i"])


async def _count(answers: list[Any]) -> int:
    return sum(isinstance(a, str) for a in answers)


@workflow(name="bench-batch")
async def batch(n: int, model: str, path: str) -> int:
    """``path``: 'auto' (the default map), 'local' (spread=False), 'placed' (remote=True)."""
    items = [{"model": model, "i": i} for i in range(n)]
    cap = CAPS[model]
    if path == "placed":
        return await _count(await ask_placed.map(items, concurrency=cap))
    spread = False if path == "local" else None
    return await _count(await ask.map(items, concurrency=cap, spread=spread))


@workflow(name="bench-batch-api")
async def batch_api(n: int, model: str) -> int:
    """The default map's component, its calls through the provider's Batch API."""
    items = [{"model": model, "i": i} for i in range(n)]
    return await _count(await ask.map(items, llm="batch"))


@component(remote=True)
async def double(i: int) -> int:
    return 2 * i


@workflow(name="bench-batch-items")
async def batch_items(n: int) -> int:
    out = await double.map(range(n), concurrency=256)
    return sum(isinstance(o, int) for o in out)


async def plain(base_url: str, n: int, model: str) -> float:
    """n calls, cap at a time: plain asyncio + the openai SDK, one process."""
    gate = asyncio.Semaphore(CAPS[model])
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sim", max_retries=0)

    async def one(i: int) -> None:
        async with gate:
            await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": str(i)}]
            )

    async with client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0


def through_gateway(api: Client, name: str, body: dict[str, Any], n: int) -> float:
    """POST the run, follow its events to the terminal one; seconds in between."""
    t0 = time.perf_counter()
    run = api.start(name, body)
    last = None
    for entry in api.events(run["id"]):
        last = entry
    elapsed = time.perf_counter() - t0
    assert last is not None and last.type == "run.succeeded", api.get(run["id"]).get("error")
    assert api.get(run["id"])["output"] == n
    return elapsed


def _roles(procs: dict[str, Any], sim: Any) -> dict[str, list[int]]:
    return {
        "gateway": [procs["gateway"].pid], "worker": [procs["worker"].pid], "sim": [sim.pid],
        "run hosts": processes("ray::RunHost"), "map actors": processes("ray::MapActor"),
        "redis": processes("redis-server"),
    }  # fmt: skip


def scenario(
    api: Client, base_url: str, procs: dict[str, Any], sim: Any, n: int, model: str,
    latency: float, rounds: int = 3,
) -> dict[str, float]:  # fmt: skip
    ideal = n / CAPS[model] * latency
    walls: dict[str, list[float]] = {"plain": [], "auto": [], "local": [], "placed": []}
    cpu: dict[str, dict[str, float]] = {}
    for _ in range(rounds):  # interleaved, so a noisy moment does not favour one
        walls["plain"].append(asyncio.run(plain(base_url, n, model)))
        for path in ("auto", "local", "placed"):
            roles = _roles(procs, sim)
            before = {r: sum(map(cpu_seconds, p)) for r, p in roles.items()}
            t0 = busy_seconds()
            walls[path].append(
                through_gateway(api, "bench-batch", {"n": n, "model": model, "path": path}, n)
            )
            spent = cpu.setdefault(path, {})
            spent["machine"] = spent.get("machine", 0) + (busy_seconds() - t0) / rounds
            for r, pids in roles.items():
                spent[r] = spent.get(r, 0) + (sum(map(cpu_seconds, pids)) - before[r]) / rounds
    base = statistics.median(walls["plain"])
    print(f"  {n} calls x {latency * 1e3:.0f} ms, cap {CAPS[model]}, median of {rounds}:"
          f" ideal {ideal:.2f} s")  # fmt: skip
    print(f"    plain asyncio + openai SDK, semaphore {CAPS[model]:<4}        {base:6.2f} s"
          f"            x{base / ideal:.2f} ideal")  # fmt: skip
    labels = {"auto": "map of an unplaced component (default)",
              "local": "the same, spread=False (the run's loop)",
              "placed": "map of a placed component (remote=True)"}  # fmt: skip
    out = {"plain": base}
    for path, label in labels.items():
        wall = statistics.median(walls[path])
        out[path] = wall
        per_call = {r: v / n * 1e3 for r, v in cpu[path].items() if v > 0.01}
        print(
            f"    {label:44s} {wall:6.2f} s  x{wall / base:.2f} plain  x{wall / ideal:.2f}"
            f" ideal   CPU ms/call: " + ", ".join(f"{r} {v:.2f}" for r, v in per_call.items())
        )
    return out


def batch_api_scenario(
    api: Client, procs: dict[str, Any], sim: Any, sim_port: int, n: int, delay_ms: int
) -> None:
    """``map(llm="batch")`` of n items beside the same map online: rounds, requests per
    file, wall time (the simulator's batch takes ``delay_ms``), CPU per item."""
    sim_url = f"http://127.0.0.1:{sim_port}"
    httpx.post(f"{sim_url}/sim/config", json={"latency_ms": 100, "batch_delay_ms": delay_ms})
    print(f"  {n:,} items, the provider's Batch API (the simulator's batch: {delay_ms} ms in "
          "progress) beside the same map online, cap 256:")  # fmt: skip
    for name, body in (("bench-batch", {"n": n, "model": "gpt-4o", "path": "auto"}),
                       ("bench-batch-api", {"n": n, "model": "gpt-4o"})):  # fmt: skip
        httpx.post(f"{sim_url}/sim/reset")
        roles = _roles(procs, sim)
        before = {r: sum(map(cpu_seconds, p)) for r, p in roles.items()}
        wall = through_gateway(api, name, body, n)
        spent = {r: (sum(map(cpu_seconds, p)) - before[r]) / n * 1e3 for r, p in roles.items()}
        cpu = ", ".join(f"{r} {v:.3f}" for r, v in spent.items() if v > 0.0005)
        if name == "bench-batch":
            print(f"    online (the default map)          {wall:6.2f} s   CPU ms/item: {cpu}")
            continue
        key = {"Authorization": "Bearer sim"}
        batches = httpx.get(f"{sim_url}/v1/batches?limit=100", headers=key).json()["data"]
        per_file = [b["request_counts"]["total"] for b in batches]
        stats = httpx.get(f"{sim_url}/sim/stats").json()
        print(f'    llm="batch"                       {wall:6.2f} s   CPU ms/item: {cpu}')
        print(f"      rounds {len(batches)}, requests per file {per_file}, online calls "
              f"{stats['served']}, batch requests {stats['batch_requests_served']}; wall "
              f"beyond the batch's own {delay_ms} ms: {wall - delay_ms / 1e3:.2f} s")  # fmt: skip


def peaks(procs: dict[str, Any]) -> dict[str, float]:
    return {
        "gateway": peak_mb(procs["gateway"].pid), "worker": peak_mb(procs["worker"].pid),
        "run host": max(map(peak_mb, processes("ray::RunHost")), default=0.0),
        "map actor": max(map(peak_mb, processes("ray::MapActor")), default=0.0),
    }  # fmt: skip


def main() -> None:
    redis_url = resolve_redis_url()
    sim_port = free_port()
    base_url = f"http://127.0.0.1:{sim_port}/v1"
    env = bench_env(redis_url, "bench.batch", OPENAI_BASE_URL=base_url, OPENAI_API_KEY="sim",
                    GENX_LLM_LIMITS=json.dumps(LIMITS), GENX_BATCH_POLL_MS="250",
                    GENX_BATCH_POLL_MAX_MS="1000")  # fmt: skip
    # GENX_BENCH_ONLY=100ms,1s,10k,items,batchapi: a subset of the scenarios.
    only = set(filter(None, os.environ.get(
        "GENX_BENCH_ONLY", "100ms,1s,10k,items,batchapi").split(",")))  # fmt: skip
    try:
        with simulator(env, sim_port) as sim, stack(env) as (base, procs):
            api = Client(base, timeout=120)
            for path in ("auto", "local", "placed"):  # warm: hosts, map actors, connections
                through_gateway(api, "bench-batch", {"n": 64, "model": "gpt-4o-mini",
                                                     "path": path}, 64)  # fmt: skip
            if "100ms" in only:
                scenario(api, base_url, procs, sim, 1000, "gpt-4o-mini", 0.1)
            at_1k = peaks(procs)
            if "10k" in only:
                scenario(api, base_url, procs, sim, 10_000, "gpt-4o", 0.1)
                at_10k = peaks(procs)
                print("    peak RSS MB at 1k -> 10k calls: " + ", ".join(
                    f"{k} {at_1k[k]:.0f} -> {at_10k[k]:.0f}" for k in at_1k))  # fmt: skip
            if "1s" in only:
                httpx.post(f"http://127.0.0.1:{sim_port}/sim/config",
                           json={"latency_ms": 1000})  # fmt: skip
                scenario(api, base_url, procs, sim, 640, "gpt-4o-mini", 1.0)
            if "batchapi" in only:
                batch_api_scenario(api, procs, sim, sim_port, 10_000, 3000)
                httpx.post(f"http://127.0.0.1:{sim_port}/sim/config", json={"latency_ms": 100})
            if "items" in only:
                for n in (10_000, 100_000):
                    elapsed = through_gateway(api, "bench-batch-items", {"n": n}, n)
                    print(f"  {n:>7,} cheap items through the gateway: {elapsed:6.2f} s"
                          f" ({n / elapsed:,.0f} items/s); peak RSS MB: "
                          + ", ".join(f"{k} {v:.0f}" for k, v in peaks(procs).items()))  # fmt: skip
            api.close()
    finally:
        os.environ.pop("OPENAI_BASE_URL", None)


if __name__ == "__main__":
    main()
