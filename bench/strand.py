"""A worker killed at random moments: how long the runs it held wait before they start again on
another worker. Two kinds: runs it had taken from the queue but not started (issue 28: they
waited a fixed minute before), and runs it was running (restarted from their journal once the
worker is known dead: the baseline, the path a started run always had).

Each round: a worker that holds each batch it takes ``HOLD`` s before starting it (the debug
hook ``GENX_DEBUG_HOLD_TAKEN``: a window wide enough to be hit), ``RUNS`` runs of three 0.5 s
steps queued, the worker killed (SIGKILL, with its process group) at a random moment, a second
worker running throughout. The delay is the kill to the run's next ``started_at``.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import statistics
import subprocess
import threading
import time

from bench.stack import CLI, bench_env, pct
from genx_ray import component, workflow
from genx_ray.store import EmbeddedRedis, RunQueue, RunStore, async_redis, keys

KILLS = 20
RUNS = 40
LEASE = 6
HOLD = 1.5


@component
async def strand_pause(i: int) -> int:
    await asyncio.sleep(0.5)
    return i


@workflow(name="strand-steps")
async def strand_steps(n: int = 3) -> int:
    return sum([await strand_pause(i) for i in range(n)])


class _Worker:
    def __init__(self, env: dict[str, str], hold: float | None = None) -> None:
        extra = {"GENX_DEBUG_HOLD_TAKEN": str(hold)} if hold else {}
        self.proc = subprocess.Popen(
            [*CLI, "worker", "--hosts", "inline"], env={**env, **extra},
            start_new_session=True, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.name = ""
        self._up = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode(errors="replace")
            if found := re.search(r"worker (\S+): taking runs", line):
                self.name = found.group(1)
                self._up.set()

    def wait_up(self) -> None:
        if not self._up.wait(60):
            raise TimeoutError("worker did not start")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


async def _round(runs: RunStore, env: dict[str, str]) -> tuple[list[float], list[float]]:
    victim = _Worker(env, hold=HOLD)
    await asyncio.to_thread(victim.wait_up)
    ids = [(await runs.create("strand-steps", {"n": 3}, enqueue=True)).id for _ in range(RUNS)]
    await asyncio.sleep(random.uniform(0.2, 3.5))  # the random moment
    killed_at = time.time()
    victim.kill()
    # What it held when it died (nothing changes them before the others find it dead).
    held = {e.run_id for e in await RunQueue(runs.redis).held(victim.name)}
    got = await asyncio.gather(*(runs.get(r) for r in ids))
    taken = {r.id for r in got if r.id in held and r.status.value == "queued" and r.attempt == 1}
    workers = await asyncio.gather(*(runs.redis.hget(keys.run(r), "worker") for r in ids))
    running = {r.id for r, w in zip(got, workers, strict=True)
               if r.status.value == "running" and w == victim.name}  # fmt: skip
    delays: dict[str, list[float]] = {"taken": [], "running": []}
    deadline = time.monotonic() + 120
    left = {**dict.fromkeys(taken, "taken"), **dict.fromkeys(running, "running")}
    while left:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(left)} run(s) never started again")
        for run_id, kind in list(left.items()):
            run = await runs.get(run_id)
            again = run.attempt == (1 if kind == "taken" else 2)
            if again and run.status.value != "queued" and run.started_at is not None:
                delays[kind].append(run.started_at.timestamp() - killed_at)
                del left[run_id]
        await asyncio.sleep(0.05)
    while True:
        now = await asyncio.gather(*(runs.get(r) for r in ids))
        if all(r.status.value in ("succeeded", "failed") for r in now):
            break
        await asyncio.sleep(0.2)
    return delays["taken"], delays["running"]


def _line(label: str, values: list[float]) -> None:
    if not values:
        print(f"  {label:<40} none caught")
        return
    print(f"  {label:<40} n={len(values):>4}  p50 {statistics.median(values):5.2f} s  "
          f"p90 {pct(values, 90):5.2f} s  max {max(values):5.2f} s", flush=True)  # fmt: skip


def main() -> None:
    server = EmbeddedRedis()
    url = server.start()
    env = bench_env(url, "bench.strand", GENX_LEASE_SECONDS=str(LEASE))
    survivor = _Worker(env)
    try:
        survivor.wait_up()

        async def run() -> tuple[list[float], list[float], list[int]]:
            redis = async_redis(url)
            runs = RunStore(redis, retention_seconds=600)
            taken: list[float] = []
            running: list[float] = []
            caught: list[int] = []
            try:
                for _ in range(KILLS):
                    t, r = await _round(runs, env)
                    taken += t
                    running += r
                    caught.append(len(t))
                    print(f"  kill {len(caught)}: {len(t)} taken, {len(r)} running", flush=True)
            finally:
                await redis.aclose()
            return taken, running, caught

        taken, running, caught = asyncio.run(run())
    finally:
        survivor.kill()
        server.stop()
    print(f"  {KILLS} kills at random moments, GENX_LEASE_SECONDS={LEASE}; kill -> started again:")
    _line("runs taken, not started (issue 28)", taken)
    _line("runs running (baseline: restart path)", running)
    print(
        f"  kills that caught taken-not-started runs: {sum(1 for c in caught if c)}/{KILLS}; "
        f"every delay within the lease: {max(taken + running, default=0) <= LEASE}"
    )


if __name__ == "__main__":
    main()
