"""Workflows the gateway tests serve (GENX_WORKFLOWS=wf_fixtures with tests/ on PYTHONPATH)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from pydantic import BaseModel

from genx_ray import InputTimeout, RetryPolicy, component, publish, sleep, wait_for_input, workflow


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


class Decision(BaseModel):
    approve: bool
    comment: str = ""


@workflow(name="review")
async def review(n: int = 3, deadline: float | None = None) -> dict[str, Any]:
    """n steps, then a person's decision (None past the deadline)."""
    for i in range(n):
        await work(i, 0.05)
        publish("phase", {"i": i})
    try:
        decision = await wait_for_input(Decision, timeout=deadline, prompt="approve?")
    except InputTimeout:
        return {"decision": None}
    return {"decision": decision.model_dump(), "after": await work(n, 0)}


@workflow(name="napper")
async def napper(seconds: float = 3.0) -> str:
    """One step, a durable sleep, one step."""
    await work(0, 0)
    publish("phase", {"i": 0})
    await sleep(seconds)
    await work(1, 0)
    return "awake"


@workflow(name="family")
async def family(children: int = 2, n: int = 10, delay: float = 0.2) -> list[int]:
    """Start ``children`` runs of ``phases`` at once, then wait for each."""
    kids = [await phases.start_child(n=n, delay=delay) for _ in range(children)]
    publish("phase", {"i": 0})
    return [await kid.result() for kid in kids]


@workflow(name="leaky")
async def leaky(step_fails: bool = True) -> str:
    """Code that quotes a secret where it must not go: in a log line, and in the error a step
    raises (retried, then failing the run). Both are masked."""
    key = os.environ.get("OPENAI_API_KEY", "")
    logging.getLogger("genx_ray.wf").warning("calling the provider with key %s", key)
    if step_fails:
        await tell(f"401 from the provider: key {key} refused")
    return "never"


@component(retry=RetryPolicy(max_attempts=2, initial_interval=0.01))
async def tell(message: str) -> None:
    raise PermissionError(message)


@component
async def recite(text: str):  # type: ignore[no-untyped-def]
    """Streams its input back (each chunk an ``output`` event)."""
    for word in text.split(" "):
        yield word + " "


@workflow(name="chatty")
async def chatty(note: str = "") -> dict[str, str]:
    """Code that puts a secret everywhere a run's data goes: published data, a step's streamed
    output, the run's output. Every one is masked as the event is made."""
    key = os.environ.get("OPENAI_API_KEY", "")
    publish("note", {"key": key, "note": note})
    said = await recite(f"the key is {key}")
    return {"said": said, "key": key}
