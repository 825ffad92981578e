"""Flow control (issue 24): with ``GENX_MAX_RUNNING=50``, tenant A queues 3,000 runs of three
50 ms steps; then tenant B queues 20 runs and A 5 runs of priority 1. Figures: queued -> started
p50/p99 of B's runs and of A's urgent runs (A's backlog then many seconds deep); the whole
backlog's throughput against the same bench on the FIFO queue this replaced (the commit before
priorities, run from a copy of it, in the same run); a 100,000-run backlog's Redis bytes per
queued run, and the time to take the next run with it against with 100 queued.

One inline worker process (``genx worker --hosts inline``) on a private Redis; runs are queued
with :meth:`RunStore.create` (the gateway's call), not over HTTP.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.stack import CLI, ROOT, bench_env, pct
from genx_ray import component, workflow
from genx_ray.store import EmbeddedRedis, RunQueue, RunStore, async_redis

BACKLOG = 3000
MAX_RUNNING = 50
B_RUNS = 20
URGENT = 5
FIFO_COMMIT = "7642444"  # the last commit with the FIFO stream queue
BIG = 100_000


@component
async def flow_step(i: int) -> int:
    await asyncio.sleep(0.05)
    return i


@workflow(name="flow-three")
async def flow_three() -> int:
    return sum([await flow_step(i) for i in range(3)])


def _worker(env: dict[str, str], root: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([*CLI, "worker", "--hosts", "inline"], env=env, cwd=root,
                            stderr=subprocess.PIPE)  # fmt: skip
    up = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for raw in iter(proc.stderr.readline, b""):
            if re.search(rb"taking runs", raw):
                up.set()

    threading.Thread(target=read, daemon=True).start()
    if not up.wait(60):
        proc.kill()
        raise TimeoutError("the worker did not start")
    return proc


async def scenario(url: str) -> dict[str, Any]:
    """The backlog, then B and A's urgent runs; returns the figures (JSON-able)."""
    redis = async_redis(url)
    runs = RunStore(redis, retention_seconds=3600)
    prioritized = "priority" in inspect.signature(runs.create).parameters

    async def queue(tenant: str, n: int, priority: int = 3) -> list[str]:
        extra = {"priority": priority} if prioritized else {}
        return [(await runs.create("flow-three", None, tenant=tenant, enqueue=True,
                                   **extra)).id for _ in range(n)]  # fmt: skip

    t0 = time.time()
    backlog = await queue("a", BACKLOG)
    b = await queue("b", B_RUNS)
    urgent = await queue("a", URGENT, priority=1)
    ids = backlog + b + urgent
    while True:
        async with redis.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.hget(f"genx:run:{{{run_id}}}", "status")
            statuses = await pipe.execute()
        if all(s in ("succeeded", "failed") for s in statuses):
            break
        await asyncio.sleep(0.2)
    elapsed = time.time() - t0

    async def waits(group: list[str]) -> list[float]:
        got = await asyncio.gather(*(runs.get(r) for r in group))
        return [(r.started_at - r.created_at).total_seconds() * 1000 for r in got]

    backlog_age = (await runs.get(backlog[-1])).started_at - (await runs.get(b[0])).created_at
    await redis.aclose()
    return {
        "b": await waits(b), "urgent": await waits(urgent), "throughput": len(ids) / elapsed,
        "backlog_s": backlog_age.total_seconds(), "failed": statuses.count("failed"),
    }  # fmt: skip


def _run_scenario(url: str, root: Path) -> dict[str, Any]:
    """The scenario against a fresh worker of the code at ``root`` (this checkout, or the FIFO
    one): each its own processes, its own Redis."""
    env = bench_env(url, "bench.flow", GENX_MAX_RUNNING=str(MAX_RUNNING))
    env["PYTHONPATH"] = os.pathsep.join([str(root), env["PYTHONPATH"]])
    worker = _worker(env, root)
    try:
        out = subprocess.run([sys.executable, "-m", "bench.flow", "--scenario", url], env=env,
                             cwd=root, capture_output=True, text=True, timeout=900)  # fmt: skip
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result
    finally:
        worker.terminate()
        worker.wait(60)


def _fifo_checkout(into: str) -> Path:
    """The FIFO commit's tree (git archive), with this bench in it."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", FIFO_COMMIT], check=True,
                             capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    (Path(into) / "bench" / "flow.py").write_text(Path(__file__).read_text())
    return Path(into)


async def backlog_cost(url: str) -> dict[str, float]:
    """Bytes per queued run and the time to take the next run: 100 queued, then 100,000."""
    from genx_ray.store._queue import put_commands  # (not in the FIFO checkout)

    redis = async_redis(url)
    queue = RunQueue(redis)

    async def fill(n: int, start: int) -> None:
        for base in range(start, start + n, 5000):
            async with redis.pipeline(transaction=False) as pipe:
                for i in range(base, min(base + 5000, start + n)):
                    # a tenant in ten has most: a skewed backlog, as in the scenario
                    tenant = "big" if i % 10 else f"t{i % 100}"
                    put_commands(pipe, f"run_{i:026d}", 1, "flow-three", tenant)
                await pipe.execute()

    async def take_ms(rounds: int = 300) -> float:
        spent = []
        for _ in range(rounds):
            t = time.perf_counter()
            (entry,) = await queue.take("bench", 1)
            spent.append(time.perf_counter() - t)
            await queue.put(entry.run_id, entry.attempt, entry.workflow, tenant=entry.tenant,
                            priority=entry.priority, queued_at=time.time())  # fmt: skip
            await queue.ack(entry.id)
        return statistics.median(spent) * 1000

    await redis.flushall()
    await fill(100, 0)
    small = await take_ms()
    before = int((await redis.info("memory"))["used_memory"])
    await fill(BIG, 100)
    after = int((await redis.info("memory"))["used_memory"])
    big = await take_ms()
    await redis.aclose()
    return {"bytes_per_run": (after - before) / BIG, "take_small_ms": small, "take_big_ms": big}


def _ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values):7.0f} ms  p99 {pct(values, 99):7.0f} ms"


def main() -> None:
    figures: dict[str, dict[str, Any]] = {}
    for label, make_root in (("priorities", lambda _: ROOT), ("FIFO", _fifo_checkout)):
        server = EmbeddedRedis()
        url = server.start()
        try:
            with tempfile.TemporaryDirectory(prefix="genx-fifo-") as tmp:
                figures[label] = _run_scenario(url, make_root(tmp))
        finally:
            server.stop()
    server = EmbeddedRedis()
    url = server.start()
    try:
        cost = asyncio.run(backlog_cost(url))
    finally:
        server.stop()
    new, old = figures["priorities"], figures["FIFO"]
    print(
        f"  GENX_MAX_RUNNING={MAX_RUNNING}; A: {BACKLOG} runs of 3 x 50 ms, then B: {B_RUNS} runs, "
        f"A: {URGENT} runs of priority 1 (A's backlog then {new['backlog_s']:.1f} s deep)"
    )
    print(f"  B's runs, queued -> started            {_ms(new['b'])}   (FIFO: {_ms(old['b'])})")
    print(
        f"  A's urgent runs, queued -> started     {_ms(new['urgent'])}   "
        f"(FIFO: {_ms(old['urgent'])})"
    )
    ratio = new["throughput"] / old["throughput"]
    print(
        f"  backlog throughput                     {new['throughput']:7.1f} runs/s   "
        f"(FIFO: {old['throughput']:.1f} runs/s; x{ratio:.3f})"
    )
    print(
        f"  {BIG:,}-run backlog: {cost['bytes_per_run']:.0f} B per queued run (queue only); "
        f"next take {cost['take_big_ms']:.2f} ms (with 100 queued: {cost['take_small_ms']:.2f} ms)"
    )
    if new["failed"] or old["failed"]:
        print(f"  runs failed: {new['failed']} (FIFO: {old['failed']})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--scenario"]:
        print(json.dumps(asyncio.run(scenario(sys.argv[2]))))
    else:
        main()
