"""Small helpers shared by tests."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import httpx

from genx_ray.service import RunHandle


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
