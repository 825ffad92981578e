"""1000 LLM calls with a cap of 64: plain asyncio + the openai SDK with a semaphore of 64, the same
code on genx_ray.llm (cluster-wide limiter in Redis, retries on), and a run mapping a component
over 1000 items (each a journaled step; events and usage accounting on), against the ideal
1000 / 64 x latency, in the same run, at 100 ms simulated latency (the issue's figure) and at 1 s.
The simulator is its own process (`genx sim`), but on a small machine it shares the cores: the
client CPU per call is printed too, the overhead that does not depend on whether the machine is
saturated."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import openai

from genx_ray import component, start, workflow
from genx_ray.store import free_port, resolve_redis_url

N, CAP = 1000, 64
MODEL = "gpt-4o-mini"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def gated(client: openai.AsyncOpenAI) -> float:
    """N calls, CAP at a time: the plain asyncio shape."""
    gate = asyncio.Semaphore(CAP)

    async def one(i: int) -> None:
        async with gate:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": str(i)}]
            )

    async with client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(N)))
        return time.perf_counter() - t0


async def plain(base_url: str) -> float:
    return await gated(openai.AsyncOpenAI(base_url=base_url, api_key="sim", max_retries=0))


async def layer() -> float:
    from genx_ray.llm import AsyncOpenAI

    return await gated(AsyncOpenAI())  # plus the Redis cap of CAP from GENX_LLM_LIMITS


@component
async def ask(i: int) -> str | None:
    from genx_ray.llm import AsyncOpenAI

    r = await AsyncOpenAI().chat.completions.create(  # a client per call costs nothing
        model=MODEL, messages=[{"role": "user", "content": str(i)}]
    )
    return r.choices[0].message.content


@workflow(name="bench-llm")
async def bench_llm(n: int) -> int:
    answers = await ask.map(range(n), concurrency=CAP)  # each item a journaled step
    return sum(isinstance(a, str) for a in answers)


def timed(fn: Callable[[], float | None]) -> tuple[float, float]:
    """Wall seconds and client CPU ms per call of one round."""
    t0, c0 = time.perf_counter(), cpu()
    wall = fn()
    return wall if wall is not None else time.perf_counter() - t0, (cpu() - c0) / N * 1e3


def in_run() -> None:
    assert start(bench_llm, {"n": N}).result(600) == N


def measure(latency: float, rounds: int) -> None:
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
        asyncio.run(plain(base_url))  # warm up every path once
        asyncio.run(layer())
        start(bench_llm, {"n": 50}).result(60)
        httpx.post(f"http://127.0.0.1:{port}/sim/reset")
        figures: dict[str, list[tuple[float, float]]] = {"plain": [], "layer": [], "run": []}
        for _ in range(rounds):  # interleaved, so a noisy moment does not favour one
            figures["plain"].append(timed(lambda: asyncio.run(plain(base_url))))
            figures["layer"].append(timed(lambda: asyncio.run(layer())))
            figures["run"].append(timed(in_run))
        peak = httpx.get(f"http://127.0.0.1:{port}/sim/stats").json()["peak_concurrency"]
        ideal = N / CAP * latency
        base = statistics.median(w for w, _ in figures["plain"])
        print(f"  latency {latency * 1000:.0f} ms, median of {rounds}: ideal ({N} / {CAP} x"
              f" {latency:g} s) {ideal:.2f} s; simulator peak concurrency {peak}")  # fmt: skip
        labels = {
            "plain": f"plain asyncio + openai SDK, semaphore {CAP}",
            "layer": f"genx_ray.llm, same code + Redis cap {CAP}",
            "run": f"genx_ray.llm in a run: map(concurrency={CAP})",
        }
        for name, label in labels.items():
            wall = statistics.median(w for w, _ in figures[name])
            per_call = statistics.median(c for _, c in figures[name])
            print(f"    {label:46s} {wall:6.2f} s  x{wall / base:.2f} plain  x{wall / ideal:.2f}"
                  f" ideal   client CPU {per_call:.2f} ms/call")  # fmt: skip
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(10)


def main() -> None:
    os.environ["GENX_REDIS_URL"] = resolve_redis_url()
    os.environ.update(
        OPENAI_API_KEY="sim", GENX_LLM_LIMITS=json.dumps({MODEL: {"concurrency": CAP}})
    )
    measure(0.1, rounds=3)
    measure(1.0, rounds=1)


if __name__ == "__main__":
    main()
