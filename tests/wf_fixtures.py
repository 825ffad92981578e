"""Workflows the gateway tests serve (GENX_WORKFLOWS=wf_fixtures with tests/ on PYTHONPATH)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

from pydantic import BaseModel

from genx_ray import (
    Concurrency,
    InputTimeout,
    RetryPolicy,
    component,
    publish,
    sleep,
    wait_for_input,
    workflow,
)


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
async def family(
    children: int = 2, n: int = 10, delay: float = 0.2, child_priority: int | None = None
) -> list[int]:
    """Start ``children`` runs of ``phases`` at once (at ``child_priority`` if given, else at
    the parent's), then wait for each."""
    kid = phases.with_priority(child_priority) if child_priority else phases
    kids = [await kid.start_child(n=n, delay=delay) for _ in range(children)]
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


# -- the operator's loop (reruns, bulk actions): four steps, the third failing while a flag file
# exists; each step appends its name to the log file when it runs, so a test counts executions
# whichever process ran them.


def _ran(log: str, name: str, flag: str | None = None) -> bool:
    """Count a step's execution; whether the ``flag`` file exists."""
    with open(log, "a") as f:
        f.write(f"{name}\n")
    return flag is not None and os.path.exists(flag)


@component
async def fetch_page(url: str, log: str, delay: float = 0.0) -> str:
    _ran(log, "fetch_page")
    await asyncio.sleep(delay)
    return f"<page of {url}>"


@component
async def parse_page(page: str, log: str, delay: float = 0.0) -> str:
    _ran(log, "parse_page")
    await asyncio.sleep(delay)
    return page.strip("<>")


@component
async def enrich_page(text: str, log: str, flag: str, delay: float = 0.0) -> str:
    failing = _ran(log, "enrich_page", flag)
    await asyncio.sleep(delay)
    if failing:
        raise RuntimeError("the enrichment provider is down")
    return f"{text}, enriched"


@component
async def store_page(text: str, log: str, delay: float = 0.0) -> str:
    _ran(log, "store_page")
    await asyncio.sleep(delay)
    return f"stored: {text}"


@workflow(name="ingest")
async def ingest(url: str, log: str, flag: str, delay: float = 0.0) -> str:
    """Four steps (each ``delay`` seconds long); the third fails while the file ``flag``
    exists."""
    page = await fetch_page(url, log, delay)
    text = await parse_page(page, log, delay)
    rich = await enrich_page(text, log, flag, delay)
    return await store_page(rich, log, delay)


def ran(log: str) -> dict[str, int]:
    """How many times each step of ``ingest`` ran, from its log file."""
    counts: dict[str, int] = {}
    if os.path.exists(log):
        with open(log) as f:
            for line in f.read().split():
                counts[line] = counts.get(line, 0) + 1
    return counts


@workflow(name="keyed", concurrency=Concurrency(limit=2, key="user"))
async def keyed(user: str, hold: float = 0.5, park: float = 0.0) -> int:
    """Counts, from inside, how many runs of its user are inside at once (each refreshes a 1 s
    marker while it runs: a killed run's marker lapses); returns the most it saw. With
    ``park``, first sleeps durably (parked: it does not count against its key)."""
    from genx_ray.store import async_redis

    if park:
        await sleep(park)
    r = async_redis(os.environ["GENX_REDIS_URL"])
    marker, me, peak = f"test:keyed:{{{user}}}", uuid.uuid4().hex, 0
    try:
        end = time.time() + hold
        while True:
            now = time.time()
            await r.zadd(marker, {me: now + 1})
            await r.zremrangebyscore(marker, "-inf", now)
            peak = max(peak, int(await r.zcard(marker)))
            if now >= end:
                break
            await asyncio.sleep(0.1)
        await r.zrem(marker, me)
    finally:
        await r.aclose()
    return peak


@component(retry=RetryPolicy(max_attempts=2, initial_interval=5.0))
async def batch_summary(i: int) -> str:
    """One LLM call through genx_ray.llm (a batch map's request)."""
    from genx_ray.llm import AsyncOpenAI

    response = await AsyncOpenAI().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"Item {i} is number {i}."}]
    )
    return str(response.choices[0].message.content)


@workflow(name="batch-enrich")
async def batch_enrich(n: int) -> list[Any]:
    """A map whose calls travel in provider batches (tests/chaos/test_batch_crash.py)."""
    out = await batch_summary.map(range(n), llm="batch")
    return [r if isinstance(r, str) else {"error": str(r)} for r in out]
