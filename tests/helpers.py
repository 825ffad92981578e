"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from genx_ray.flow import registry
from genx_ray.model import Settings
from genx_ray.service import RunHandle, Worker
from genx_ray.store import async_redis


def wait_up(url: str, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    """Until ``url`` answers 200 (a server ``proc`` started); fails if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{url}: exited with {proc.returncode}"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up"
        time.sleep(0.05)


def types(handle: RunHandle) -> list[str]:
    return [e.event.type for e in handle.events(follow=False)]


def step_events(handle: RunHandle, *kinds: str) -> list[Any]:
    return [e.event for e in handle.events(follow=False) if e.event.type in kinds]


def sig(handle: RunHandle) -> list[tuple[str, str | None]]:
    """(type, step id) for every event: an exact, readable event sequence."""
    out = []
    for e in handle.events(follow=False):
        step = getattr(e.event, "step", None)
        out.append((e.event.type, step.id if step else None))
    return out


async def execute(
    redis: Any, run_id: str, registry: Any, *, redis_url: str | None = None
) -> str | None:
    """Execute one run in this process, as a host would: its own runtime, closed after (with a
    ``redis_url`` the run holds a lease)."""
    from genx_ray.engine import Executor
    from genx_ray.model import Settings

    rt = Executor(redis, registry, Settings.current(), redis_url=redis_url)
    try:
        return await rt.execute(run_id, "test")
    finally:
        await rt.close()


class SimProcess:
    """``genx sim`` in a process of its own, reconfigured per test through /sim/config."""

    def __init__(self) -> None:
        from genx_ray.store import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "genx_ray.cli", "sim", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_up(f"{self.url}/sim/stats", self.proc)

    def configure(self, **changes: Any) -> None:
        from genx_ray.llm.sim import SimConfig

        httpx.post(f"{self.url}/sim/reset").raise_for_status()
        config = {**SimConfig(latency_ms=5).model_dump(), "batch_delay_ms": 300, **changes}
        httpx.post(f"{self.url}/sim/config", json=config).raise_for_status()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.url}/sim/stats").json()
        return result

    def batches(self) -> list[dict[str, Any]]:
        """The simulator's batches, newest first."""
        key = {"Authorization": "Bearer sim-key"}
        page = httpx.get(f"{self.url}/v1/batches?limit=100", headers=key).json()
        return list(page["data"])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@asynccontextmanager
async def serving(redis_url: str, **settings: Any) -> AsyncIterator[Worker]:
    """A worker in this process (the registered test workflows, ``settings`` as given) while
    the block runs; stopped and its Redis client closed after."""
    client = async_redis(redis_url)
    w = Worker(client, registry=registry, settings=Settings(**settings), drain_timeout=1,
               redis_url=redis_url, name=f"w-{time.monotonic_ns()}")  # fmt: skip
    task = asyncio.create_task(w.serve())
    try:
        yield w
    finally:
        w.stop()
        await task
        await client.aclose()
