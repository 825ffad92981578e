"""genx_ray.llm over real HTTP to the simulator: limits, retries, fallback, cache, streams, usage."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from helpers import step_events
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from genx_ray import component, start, workflow
from genx_ray.llm import AsyncOpenAI, OpenAI, Policy
from genx_ray.llm._shared import Pools
from genx_ray.model import ConfigError
from genx_ray.store import keys, sync_redis

from .conftest import Sim


def _msg(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _uniq(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


CALLER = """
import asyncio, sys
from genx_ray.llm import AsyncOpenAI
async def main():
    c = AsyncOpenAI()
    await asyncio.gather(*(c.chat.completions.create(model=sys.argv[1], messages=[
        {"role": "user", "content": str(i)}]) for i in range(int(sys.argv[2]))))
asyncio.run(main())
"""


def test_the_concurrency_cap_holds_across_two_processes(sim: Sim, redis_url: str) -> None:
    model = _uniq("capx")
    sim.configure(latency_ms=100)
    env = {**os.environ, "GENX_LLM_LIMITS": json.dumps({f"{model[:4]}*": {"concurrency": 5}})}
    procs = [
        subprocess.Popen([sys.executable, "-c", CALLER, model, "30"], env=env) for _ in range(2)
    ]
    assert [p.wait(120) for p in procs] == [0, 0]
    stats = sim.stats()
    assert stats["served"] == 60 and stats["rejected"] == 0
    assert stats["peak_concurrency"] == 5  # never above the cap, and the cap was used
    # Both ended normally: every slot is back, none left to expire (not even the ones each
    # process kept for a moment for its next call).
    assert sync_redis(redis_url).zcard(keys.llm_budget(f"{model[:4]}*").concurrency) == 0


async def test_a_client_per_call_shares_one_pool_and_budget(
    sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The common pattern of building a client inside the component: 200 calls, 200 clients,
    yet one set of connection pools and one limiter queue (the cap of 16 holds, and connections
    stay near 16, not 200)."""
    model = _uniq("per-call")
    monkeypatch.setenv("GENX_LLM_LIMITS", json.dumps({model: {"concurrency": 16}}))

    async def call(i: int) -> str | None:
        r = await AsyncOpenAI().chat.completions.create(model=model, messages=_msg(str(i)))
        return r.choices[0].message.content

    answers = await asyncio.gather(*(call(i) for i in range(200)))
    assert len(set(answers)) == 200
    stats = sim.stats()
    assert stats["served"] == 200 and stats["peak_concurrency"] <= 16
    # Not one per client: about one per slot (requests are dealt over a few pools in turn, so a
    # pool may open one while another has one idle).
    assert stats["connections"] <= 16 + Pools.SHARDS


async def test_a_client_per_call_runs_nothing_on_a_thread(sim: Sim) -> None:
    """The SDK looks the platform up on a worker thread at each client's first request: with a
    client per call, that would be a thread hop per call. Ours looks it up once per process."""
    loop = asyncio.get_running_loop()
    handed: list[object] = []
    original = loop.run_in_executor

    def counting(executor: Any, func: Any, *args: Any) -> Any:
        handed.append(func)
        return original(executor, func, *args)

    loop.run_in_executor = counting  # type: ignore[method-assign]
    try:
        for i in range(3):
            await AsyncOpenAI().chat.completions.create(model="gpt-4o-mini", messages=_msg(str(i)))
    finally:
        del loop.run_in_executor
    assert handed == []


async def test_rpm_budget(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _uniq("rpm")
    monkeypatch.setenv("GENX_LLM_LIMITS", json.dumps({model: {"rpm": 5}}))
    client = AsyncOpenAI()
    calls = [asyncio.create_task(client.chat.completions.create(model=model, messages=_msg(str(i))))
             for i in range(7)]  # fmt: skip
    done, pending = await asyncio.wait(calls, timeout=2)
    assert len(done) == 5 and len(pending) == 2  # the last two wait for the minute to roll
    for task in pending:
        task.cancel()
    assert sim.stats()["served"] == 5


async def test_tpm_budget_is_estimated_then_corrected(
    sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _uniq("tpm")
    sim.configure(latency_ms=300)
    monkeypatch.setenv("GENX_LLM_LIMITS", json.dumps({model: {"tpm": 150}}))
    client = AsyncOpenAI()

    async def call(i: int) -> None:
        await client.chat.completions.create(model=model, messages=_msg(f"hi {i}"), max_tokens=100)

    t0 = time.monotonic()
    await asyncio.gather(call(1), call(2))  # each is estimated at ~100 tokens: one at a time
    assert time.monotonic() - t0 >= 0.6
    t0 = time.monotonic()
    await call(3)  # the real use (a few tokens) replaced the estimates: room again at once
    assert time.monotonic() - t0 < 0.5


async def test_retry_after_pauses_every_client(
    sim: Sim, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _uniq("ra")
    sim.configure(throttle_next=1, retry_after=1.0)
    first, second = AsyncOpenAI(), AsyncOpenAI()  # two clients: separate transports
    a = asyncio.create_task(first.chat.completions.create(model=model, messages=_msg("a")))
    pause = keys.llm_budget(model).pause
    for _ in range(1000):  # until a got its 429 and paused the model for everyone
        if (left_ms := await redis.pttl(pause)) > 0:
            break
        await asyncio.sleep(0.005)
    seen = time.monotonic()
    b = await second.chat.completions.create(model=model, messages=_msg("b"))
    # b waited out what was left of the pause instead of hitting the API
    assert time.monotonic() - seen >= left_ms / 1000 - 0.05
    await a
    assert b.choices[0].message.content and sim.stats()["rejected"] == 1


FAST = {"initial_interval": 0.01}


@component
async def ask(model: str, text: str, fallback: bool) -> str:
    policy = (
        Policy(fallback=("fb-primary", "fb-backup"), max_attempts=2, breaker_failures=2,
               breaker_cooldown=2.0, **FAST)
        if fallback else Policy(max_attempts=3, **FAST)
    )  # fmt: skip
    client = AsyncOpenAI(policy=policy)
    r = await client.chat.completions.create(model=model, messages=_msg(text))
    return f"{r.model}: {r.choices[0].message.content}"  # which model answered, and what


@workflow(name="llm-ask")
async def ask_wf(model: str, text: str, fallback: bool = True) -> str:
    return await ask(model, text, fallback)


def test_5xx_is_retried_and_counted_in_usage(sim: Sim) -> None:
    sim.configure(fail_next=2)
    h = start(ask_wf, {"model": "gpt-4o-mini", "text": "retry me", "fallback": False})
    assert h.result(30) == "gpt-4o-mini: Retry me."
    assert sim.stats()["failed"] == 2 and sim.stats()["served"] == 1
    run = h.get()
    assert run.usage is not None and run.usage["calls"] == 1 and run.usage["retries"] == 2
    retries = [e.data for e in step_events(h, "progress") if e.kind == "llm.retry"]
    assert [(r["attempt"], r["error"]) for r in retries] == [
        (1, "gpt-4o-mini: HTTP 500"), (2, "gpt-4o-mini: HTTP 500"),
    ]  # fmt: skip


def test_fallback_after_an_outage_and_recovery(sim: Sim) -> None:
    sim.configure(down_models=["fb-primary"], models=["fb-primary", "fb-backup"])
    for i in range(3):
        h = start(ask_wf, {"model": "fb-primary", "text": f"x{i}"})
        assert h.result(30).startswith("fb-backup: ")
    moved = [e.data for e in step_events(h, "progress") if e.kind == "llm.fallback"]
    assert moved == [{"from": "fb-primary", "to": "fb-backup", "reason": "circuit open"}]
    # The first two calls tried the primary (2 attempts each) and tripped the breaker; the third
    # went straight to the backup.
    assert sim.stats()["by_model"] == {"fb-primary": 4, "fb-backup": 3}
    sim.configure(down_models=[], models=["fb-primary", "fb-backup"])
    time.sleep(2.1)  # the breaker's cooldown: the primary gets a call again
    assert (
        start(ask_wf, {"model": "fb-primary", "text": "back"}).result(30).startswith("fb-primary: ")
    )


async def test_response_cache(sim: Sim) -> None:
    client = AsyncOpenAI(cache_ttl=60)
    text = _uniq("cache")
    a = await client.chat.completions.create(model="gpt-4o-mini", messages=_msg(text))
    b = await client.chat.completions.create(model="gpt-4o-mini", messages=_msg(text))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert sim.stats()["served"] == 1


@component
async def cached_answer(text: str) -> str:
    client = AsyncOpenAI(cache_ttl=60)
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=_msg(text))
    return answer.choices[0].message.content or ""


@workflow(name="llm-cached")
async def cached_wf(text: str) -> str:
    return await cached_answer(text)


def test_the_response_cache_is_per_tenant(sim: Sim) -> None:
    """Tenant B asking what tenant A asked is a call of its own, not A's cached answer."""
    text = _uniq("tenants")
    served = sim.stats()["served"]
    assert start(cached_wf, {"text": text}, tenant="acme").result(30)
    assert sim.stats()["served"] == served + 1
    assert start(cached_wf, {"text": text}, tenant="globex").result(30)
    assert sim.stats()["served"] == served + 2  # a miss: globex's cache is its own
    assert start(cached_wf, {"text": text}, tenant="acme").result(30)
    assert sim.stats()["served"] == served + 2  # acme's own answer, from its cache


@component
async def stream_answer(text: str) -> str:
    client = AsyncOpenAI()
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=_msg(text), stream=True, stream_options={"include_usage": True}
    )
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    return "".join(parts)


@workflow(name="llm-stream")
async def stream_wf(text: str) -> str:
    return await stream_answer(text)


def test_streamed_chunks_become_output_events_in_order(sim: Sim) -> None:
    h = start(stream_wf, {"text": "one two three four five"})
    text = h.result(30)
    outputs = step_events(h, "output")
    assert text == "One two three four five."
    assert "".join(o.data for o in outputs) == text and len(outputs) == 5  # a chunk a word
    assert {o.step.id for o in outputs} == {"/0:stream_answer"}
    usage = h.get().usage
    assert usage == {"calls": 1, "prompt_tokens": 5, "completion_tokens": 5, "retries": 0,
                     "cost_usd": pytest.approx((5 * 2.5 + 5 * 10.0) / 1e6)}  # fmt: skip


CRASHER = """
import asyncio, sys
from genx_ray.llm import AsyncOpenAI
async def main():
    c = AsyncOpenAI()
    print("holding", flush=True)
    await c.chat.completions.create(model=sys.argv[1], messages=[{"role": "user", "content": "x"}])
asyncio.run(main())
"""


async def test_a_crashed_holders_slot_comes_back(
    sim: Sim, monkeypatch: pytest.MonkeyPatch, redis: Any
) -> None:
    model = _uniq("crash")
    limits = json.dumps({model: {"concurrency": 1}})
    sim.configure(latency_ms=30_000)  # the holder's call never finishes
    env = {**os.environ, "GENX_LLM_LIMITS": limits, "GENX_LLM_LEASE_SECONDS": "2"}
    holder = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block for long
        [sys.executable, "-c", CRASHER, model], env=env, stdout=subprocess.PIPE
    )
    deadline = time.monotonic() + 30
    while await redis.zcard(keys.llm_budget(model).concurrency) < 1:  # it holds the only slot
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    sim.configure(latency_ms=10)
    monkeypatch.setenv("GENX_LLM_LIMITS", limits)
    monkeypatch.setenv("GENX_LLM_LEASE_SECONDS", "2")
    t0 = time.monotonic()
    await AsyncOpenAI().chat.completions.create(model=model, messages=_msg("after"))
    assert time.monotonic() - t0 < 3.5  # the dead holder's lease expired; no minute-long wait


EXITER = """
import asyncio, os, sys
from genx_ray.llm import AsyncOpenAI
async def main():
    c = AsyncOpenAI()
    await asyncio.gather(*(c.chat.completions.create(model=sys.argv[1], messages=[
        {"role": "user", "content": str(i)}]) for i in range(8)))
    await asyncio.sleep(0.05)
    os._exit(0)  # as if killed: the freed slots it kept for its next calls are not given back
asyncio.run(main())
"""


async def test_slots_a_process_kept_come_back_soon_after_it_ends(
    sim: Sim, monkeypatch: pytest.MonkeyPatch, redis: Any
) -> None:
    """A process keeps a freed slot a moment for its next call (no Redis round trip); if it is
    killed right then, the slot's short lease gives it back within about a second, not a full
    lease."""
    model = _uniq("kept")
    limits = json.dumps({model: {"concurrency": 4}})
    env = {**os.environ, "GENX_LLM_LIMITS": limits}
    exiter = await asyncio.create_subprocess_exec(sys.executable, "-c", EXITER, model, env=env)
    assert await exiter.wait() == 0
    kept = await redis.zrange(keys.llm_budget(model).concurrency, 0, -1, withscores=True)
    assert len(kept) == 4  # it did keep them...
    assert all(expiry / 1000 - time.time() < 1.5 for _, expiry in kept)  # ...on a short lease
    monkeypatch.setenv("GENX_LLM_LIMITS", limits)
    client = AsyncOpenAI()
    t0 = time.monotonic()
    await asyncio.gather(*(client.chat.completions.create(model=model, messages=_msg(str(i)))
                           for i in range(4)))  # fmt: skip
    assert time.monotonic() - t0 < 2.5  # the lease is 60 s: a full one would time the test out
    assert sim.stats()["served"] == 12


async def test_a_span_per_call_with_genai_attributes(sim: Sim) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    from genx_ray.observe import traced_into

    with traced_into(provider):
        await AsyncOpenAI().chat.completions.create(model="gpt-4o-mini", messages=_msg("span me"))
    (span,) = exporter.get_finished_spans()
    attrs: dict[str, Any] = dict(span.attributes or {})
    assert span.name == "chat gpt-4o-mini" and span.kind is trace.SpanKind.CLIENT
    assert attrs["gen_ai.system"] == "openai" and attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.usage.input_tokens"] == 2 and attrs["gen_ai.usage.output_tokens"] == 2
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)


def test_no_api_key_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        AsyncOpenAI()
    assert info.value.setting == "OPENAI_API_KEY"


def test_an_unknown_fallback_model_names_the_setting(sim: Sim) -> None:
    client = OpenAI(fallback=["gpt-4o", "gpt-5-imaginary"])
    with pytest.raises(ConfigError) as info:
        client.chat.completions.create(model="gpt-4o", messages=_msg("x"))
    assert info.value.setting == "fallback" and "gpt-5-imaginary" in str(info.value)
    assert sim.stats()["served"] == 0  # refused before any call was made


@component
def sync_ask(text: str) -> str:
    client = OpenAI()
    r = client.chat.completions.create(model="gpt-4o-mini", messages=_msg(text))
    return f"{r.model}: {r.choices[0].message.content}"


@workflow(name="llm-sync")
async def sync_wf(text: str) -> str:
    return await sync_ask(text)


def test_the_sync_client_in_a_sync_step(sim: Sim) -> None:
    sim.configure(fail_next=1)
    h = start(sync_wf, {"text": "sync call"})
    assert h.result(30) == "gpt-4o-mini: Sync call."
    run = h.get()
    assert run.usage is not None and run.usage["calls"] == 1 and run.usage["retries"] == 1
    (retry,) = [e for e in step_events(h, "progress") if e.kind == "llm.retry"]
    assert retry.step.id == "/0:sync_ask"  # the caller's step context came along


@component
async def relay(text: str):  # type: ignore[no-untyped-def]
    stream = await AsyncOpenAI().chat.completions.create(
        model="gpt-4o", messages=_msg(text), stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            yield chunk.choices[0].delta.content


@workflow(name="llm-relay")
async def relay_wf(text: str) -> str:
    return await relay(text)


def test_a_streaming_component_relaying_an_llm_stream_emits_each_chunk_once(sim: Sim) -> None:
    h = start(relay_wf, {"text": "alpha beta gamma"})
    text = h.result(30)
    outputs = [o.data for o in step_events(h, "output")]
    assert "".join(outputs) == text and len(outputs) == 3  # a chunk a word, no duplicates


@component
async def llm_burst(model: str, n: int, max_tokens: int | None = None) -> float:
    """``n`` calls at once; how long they took, in all."""
    client = AsyncOpenAI()
    extra = {} if max_tokens is None else {"max_tokens": max_tokens}
    t0 = time.monotonic()
    await asyncio.gather(*(client.chat.completions.create(model=model, messages=_msg(str(i)),
                                                          **extra)
                           for i in range(n)))  # fmt: skip
    return time.monotonic() - t0


@workflow(name="llm-burst")
async def burst_wf(model: str, n: int, max_tokens: int | None = None) -> float:
    return await llm_burst(model, n, max_tokens)


def test_a_tenant_at_its_llm_budget_slows_only_itself(
    sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _uniq("tenant-budget")
    sim.configure(latency_ms=200)
    limits = {"slowco": {"llm_concurrency": 1}, "tpmco": {"llm_tokens_per_minute": 600}}
    monkeypatch.setenv("GENX_TENANT_LIMITS", json.dumps(limits))
    slow = start(burst_wf, {"model": model, "n": 4}, tenant="slowco")
    fast = start(burst_wf, {"model": model, "n": 4}, tenant="fastco")
    assert fast.result(30) < 0.6  # all four at once: its neighbour's budget is not its own
    assert slow.result(30) >= 0.8  # one at a time
    # Tokens per minute: each call books its tokens in the tenant's own budget (cluster-wide,
    # in Redis), corrected from the usage the provider reported.
    assert start(burst_wf, {"model": model, "n": 2}, tenant="tpmco").result(30) < 2
    booked = sync_redis(os.environ["GENX_REDIS_URL"]).zrange(
        keys.llm_budget("genx-tenant:tpmco").tokens, 0, -1
    )
    assert len(booked) == 2 and all(0 < int(m.rpartition(":")[2]) < 200 for m in booked)


def test_a_tenant_at_its_tokens_per_minute_slows_only_itself(
    sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call is booked at ~100 tokens before it is sent (max_tokens): a budget of 150 a
    minute lets one call at a time through for that tenant, and none of its neighbour's."""
    model = _uniq("tenant-tpm")
    sim.configure(latency_ms=400)
    monkeypatch.setenv(
        "GENX_TENANT_LIMITS", json.dumps({"tpm-slow": {"llm_tokens_per_minute": 150}})
    )
    burst = {"model": model, "n": 2, "max_tokens": 100}
    slow = start(burst_wf, burst, tenant="tpm-slow")
    free = start(burst_wf, burst, tenant="tpm-free")
    assert free.result(30) < 0.75  # both at once
    assert slow.result(30) >= 0.8  # one, then the other once the first's real use is booked
