"""Small helpers shared by tests."""

from __future__ import annotations

from typing import Any

from genx_ray.local import RunHandle


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
    from genx_ray.runtime import Runtime
    from genx_ray.settings import Settings

    rt = Runtime(redis, registry, Settings.current(), redis_url=redis_url)
    try:
        return await rt.execute(run_id, "test")
    finally:
        await rt.close()
