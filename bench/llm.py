"""1000 LLM calls with a cap of 64: genx_ray.llm (cluster-wide limiter in Redis, retries, events
and usage accounting on, inside a run) against plain asyncio + the openai SDK with a semaphore of
64, and the ideal 1000 / 64 x latency, in the same run, at 100 ms simulated latency (the issue's
figure) and at 1 s. The simulator is its own process (`genx sim`), but on a small machine it
shares the cores: the client CPU per call is printed too, as the overhead that does not depend on
whether the machine is saturated."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time

import httpx
import openai

from genx_ray import component, start, workflow
from genx_ray.connections import resolve_redis_url
from genx_ray.embedded import free_port

N, CAP = 1000, 64
MODEL = "gpt-4o-mini"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def plain(base_url: str) -> float:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sim", max_retries=0)
    gate = asyncio.Semaphore(CAP)

    async def one(i: int) -> None:
        async with gate:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": str(i)}]
            )

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(N)))
    return time.perf_counter() - t0


@component
async def many_calls(n: int) -> int:
    from genx_ray.llm import AsyncOpenAI

    client = AsyncOpenAI()  # the cap comes from GENX_LLM_LIMITS, shared through Redis
    await asyncio.gather(*(
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": str(i)}])
        for i in range(n)
    ))  # fmt: skip
    return n


@workflow(name="bench-llm")
async def bench_llm(n: int) -> int:
    return await many_calls(n)


def measure(latency: float) -> None:
    port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "genx_ray.cli", "sim", "--port", str(port),
                            "--latency-ms", str(latency * 1000)])  # fmt: skip
    base_url = f"http://127.0.0.1:{port}/v1"
    os.environ["OPENAI_BASE_URL"] = base_url
    try:
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{port}/sim/stats", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        asyncio.run(plain(base_url))  # warm up both paths once
        start(bench_llm, {"n": 50}).result(60)
        c0 = cpu()
        base = asyncio.run(plain(base_url))
        base_cpu = (cpu() - c0) / N * 1e3
        httpx.post(f"http://127.0.0.1:{port}/sim/reset")
        t0, c0 = time.perf_counter(), cpu()
        start(bench_llm, {"n": N}).result(600)
        ours, ours_cpu = time.perf_counter() - t0, (cpu() - c0) / N * 1e3
        peak = httpx.get(f"http://127.0.0.1:{port}/sim/stats").json()["peak_concurrency"]
        ideal = N / CAP * latency
        head = f"  latency {latency * 1000:.0f} ms: ideal ({N} / {CAP} x {latency:g} s)"
        print(f"{head}  {ideal:6.2f} s")
        print(f"    plain asyncio + openai SDK, semaphore {CAP}  {base:6.2f} s"
              f"  (x{base / ideal:.2f} ideal)   client CPU {base_cpu:.2f} ms/call")  # fmt: skip
        print(f"    genx_ray.llm in a run, Redis cap {CAP}      {ours:6.2f} s  (x{ours / base:.2f}"
              f" plain, x{ours / ideal:.2f} ideal)   client CPU {ours_cpu:.2f} ms/call;"
              f" peak concurrency {peak}")  # fmt: skip
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(10)


def main() -> None:
    os.environ["GENX_REDIS_URL"] = resolve_redis_url()
    os.environ.update(
        OPENAI_API_KEY="sim", GENX_LLM_LIMITS=json.dumps({MODEL: {"concurrency": CAP}})
    )
    for latency in (0.1, 1.0):
        measure(latency)


if __name__ == "__main__":
    main()
