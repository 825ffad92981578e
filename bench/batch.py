"""Batch ingestion at cluster scale, the whole stack: runs submitted through the gateway (HTTP),
taken by a worker, executed by a run host on Ray, their items mapped over the pool actors.

1. 1000 LLM calls at 100 ms simulated latency, cap 64 (``GENX_LLM_LIMITS``), POST to terminal
   event, against plain asyncio + the openai SDK with a semaphore of 64 and the ideal
   1000 / 64 x 0.1 s, in the same run (median of 3, interleaved). Plain asyncio is one process
   on one core; ours spreads the calls over the pool actors (one per core). Both share the
   machine with the simulator; the CPU the whole machine spent per run, over its cores, is the
   floor no scheduling can beat here, printed too.
2. 10k and 100k cheap items (no LLM): time, and the peak memory (VmHWM) of every process:
   gateway, worker, run host, pool actor.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.llm import CAP, MODEL, N, plain
from genx_ray import component, workflow
from genx_ray.client import Client
from genx_ray.connections import resolve_redis_url
from genx_ray.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent


@component(remote=True)  # placed: mapped over the pool actors, not in the run host
async def ask(i: int) -> str | None:
    from genx_ray.llm import AsyncOpenAI

    r = await AsyncOpenAI().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": str(i)}]
    )
    return r.choices[0].message.content


@component(remote=True)
async def double(i: int) -> int:
    return 2 * i


@workflow(name="bench-batch-llm")
async def batch_llm(n: int) -> int:
    answers = await ask.map(range(n), concurrency=CAP)
    return sum(isinstance(a, str) for a in answers)


@workflow(name="bench-batch-items")
async def batch_items(n: int) -> int:
    out = await double.map(range(n), concurrency=256)
    return sum(isinstance(o, int) for o in out)


def through_gateway(api: Client, name: str, n: int) -> float:
    """POST the run, follow its events to the terminal one; seconds in between."""
    t0 = time.perf_counter()
    run = api.start(name, {"n": n})
    last = None
    for entry in api.events(run["id"]):
        last = entry.event
    elapsed = time.perf_counter() - t0
    assert last is not None and last.type == "run.succeeded", last
    assert api.get(run["id"])["output"] == n
    return elapsed


def _peak_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (every process, the kernel too)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def _ray_processes(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if cmdline.startswith(marker):
                pids.append(int(entry.name))
    return pids


def main() -> None:
    redis_url = resolve_redis_url()
    sim_port, api_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{sim_port}/v1"
    env = {
        **os.environ, "GENX_REDIS_URL": redis_url, "GENX_WORKFLOWS": "bench.batch",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "sim",
        "GENX_LLM_LIMITS": json.dumps({MODEL: {"concurrency": CAP}}),
    }  # fmt: skip
    cli = [sys.executable, "-m", "genx_ray.cli"]
    procs = {
        "sim": subprocess.Popen(
            [*cli, "sim", "--port", str(sim_port), "--latency-ms", "100"], env=env
        ),
        "gateway": subprocess.Popen([*cli, "gateway", "--port", str(api_port)], env=env),
        "worker": subprocess.Popen([*cli, "worker"], env=env, stderr=subprocess.DEVNULL),
    }
    api = Client(f"http://127.0.0.1:{api_port}", timeout=60)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=1).is_success:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        through_gateway(api, "bench-batch-llm", CAP)  # warm: a run host, the pool actor
        asyncio.run(plain(base_url))
        ours, base = [], []
        roles = {"gateway": [procs["gateway"].pid], "worker": [procs["worker"].pid],
                 "sim": [procs["sim"].pid], "run hosts": _ray_processes("ray::RunHost"),
                 "pool actor": _ray_processes("ray::PoolActor")}  # fmt: skip
        cpu: dict[str, float] = dict.fromkeys(roles, 0.0)
        busy = {"plain": 0.0, "ours": 0.0}
        for _ in range(3):
            t0 = _busy_seconds()
            base.append(asyncio.run(plain(base_url)))
            busy["plain"] += (_busy_seconds() - t0) / 3
            before = {r: sum(map(_cpu_seconds, pids)) for r, pids in roles.items()}
            t0 = _busy_seconds()
            ours.append(through_gateway(api, "bench-batch-llm", N))
            busy["ours"] += (_busy_seconds() - t0) / 3
            for r, pids in roles.items():
                cpu[r] += (sum(map(_cpu_seconds, pids)) - before[r]) / 3
        ideal = N / CAP * 0.1
        b, o = statistics.median(base), statistics.median(ours)
        print(f"  {N} LLM calls, 100 ms latency, cap {CAP}, median of 3: ideal {ideal:.2f} s")
        print(f"    plain asyncio + openai SDK, semaphore {CAP}       {b:6.2f} s  x{b / ideal:.2f}"
              " ideal")  # fmt: skip
        runs = ", ".join(f"{x:.2f}" for x in ours)
        print(f"    gateway -> worker -> run host -> pool actors   {o:6.2f} s  x{o / b:.2f} plain"
              f"  x{o / ideal:.2f} ideal   (runs: {runs})")  # fmt: skip
        print("      CPU seconds per run: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
        cores = os.cpu_count() or 1
        floor = busy["ours"] / cores
        print(f"    the machine's CPU, every process, per run: plain {busy['plain']:.2f} s,"
              f" ours {busy['ours']:.2f} s; on {cores} cores ours cannot take less than"
              f" {floor:.2f} s (x{floor / ideal:.2f} ideal)")  # fmt: skip
        for n in (10_000, 100_000):
            elapsed = through_gateway(api, "bench-batch-items", n)
            hosts = _ray_processes("ray::RunHost")
            pools = _ray_processes("ray::PoolActor")
            peaks = {
                "gateway": _peak_mb(procs["gateway"].pid),
                "worker": _peak_mb(procs["worker"].pid),
                "run host": max((_peak_mb(p) for p in hosts), default=0.0),
                "pool actor": max((_peak_mb(p) for p in pools), default=0.0),
            }
            print(f"  {n:>7,} items through the gateway: {elapsed:6.2f} s"
                  f" ({n / elapsed:,.0f} items/s); peak RSS MB: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))  # fmt: skip
    finally:
        api.close()
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
