"""The workflow the observability tests run (GENX_WORKFLOWS=wf_observe): an LLM call in a step, a
pause (a window to kill its host in), a map of LLM calls on the map actors, a Ray task, and a
last LLM call."""

from __future__ import annotations

import asyncio
from typing import Any

from genx_ray import component, publish, workflow
from genx_ray.llm import AsyncOpenAI

MODEL = "gpt-4o-mini"


async def _ask(prompt: str) -> str:
    r = await AsyncOpenAI().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}]
    )
    return r.choices[0].message.content or ""


@component
async def ask(prompt: str) -> str:
    return await _ask(prompt)


@component(remote=True)
async def ask_placed(i: int) -> str:
    """Placed: its map goes to the map actors."""
    return await _ask(f"item {i}")


@component(remote=True)
def shout(text: str) -> str:
    """Placed, called alone: a Ray task."""
    return text.upper()


@component
async def pause(seconds: float) -> float:
    publish("paused", {"seconds": seconds})
    await asyncio.sleep(seconds)
    return seconds


@workflow(name="observed")
async def observed(n: int = 4, wait: float = 0.0) -> dict[str, Any]:
    await ask("hello")
    if wait:
        await pause(wait)
    answers = await ask_placed.map(range(n), concurrency=4)
    loud = await shout("done")
    await ask("bye")
    return {"answers": sum(isinstance(a, str) for a in answers), "loud": loud}
