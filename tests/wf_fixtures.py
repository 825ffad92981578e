"""Workflows the gateway tests serve (GENX_WORKFLOWS=wf_fixtures with tests/ on PYTHONPATH)."""

from __future__ import annotations

import asyncio

from genx_ray import component, publish, workflow


@component
async def shout(text: str) -> str:
    return text.upper()


@workflow(name="echo")
async def echo(text: str) -> str:
    """Shout the text back."""
    return await shout(text)


@component
async def tick(i: int, delay: float) -> int:
    await asyncio.sleep(delay)
    publish("tick", {"i": i})
    return i


@workflow(name="ticker")
async def ticker(n: int = 50, delay: float = 0.01) -> int:
    """Publish n progress events, one per step."""
    total = 0
    for i in range(n):
        total += await tick(i, delay)
    return total


@workflow(name="sleepy")
async def sleepy(seconds: float = 30.0) -> str:
    await asyncio.sleep(seconds)
    return "awake"


@workflow(name="boom")
async def boom(message: str = "boom") -> str:
    """Fail with the message."""
    raise ValueError(message)


@component
async def work(i: int, delay: float) -> int:
    await asyncio.sleep(delay)
    return i


@workflow(name="phases")
async def phases(n: int = 10, delay: float = 0.2) -> int:
    """n steps; after each, a progress event published from the workflow body (journaled: a
    restarted run does not send it again)."""
    total = 0
    for i in range(n):
        total += await work(i, delay)
        publish("phase", {"i": i})
    return total
