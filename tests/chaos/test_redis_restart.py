"""Redis restarted mid-run: nothing acknowledged is lost, and the run completes."""

from __future__ import annotations

import asyncio

import wf_fixtures  # noqa: F401 - registers the ticker workflow
from helpers import execute

from genx_ray.flow import registry
from genx_ray.model import RunStatus
from genx_ray.store import EmbeddedRedis, EventStore, RunStore, async_redis


async def test_a_redis_restart_mid_run_loses_nothing_acknowledged() -> None:
    server = EmbeddedRedis(appendonly=True)
    url = server.start()
    client = async_redis(url)
    try:
        runs, events = RunStore(client), EventStore(client)
        run = await runs.create("ticker", {"n": 30, "delay": 0.05})
        host = asyncio.create_task(execute(client, run.id, registry, redis_url=url))
        while sum(e.event.type == "progress" for e in await events.read(run.id)) < 8:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        acknowledged = [e.id for e in await events.read(run.id)]
        await asyncio.to_thread(server.restart, 1.0)  # down for a second, mid-step
        assert await asyncio.wait_for(host, 60) == RunStatus.SUCCEEDED
        stored = await events.read(run.id)
        ids = [e.id for e in stored]
        assert ids[: len(acknowledged)] == acknowledged  # nothing acknowledged was lost
        ticks = sorted({e.event.data["i"] for e in stored if e.event.type == "progress"})  # type: ignore[union-attr,index]
        assert ticks == list(range(30))
        assert (await runs.get(run.id)).output == sum(range(30))
    finally:
        await client.aclose()
        server.stop()
