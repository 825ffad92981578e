"""``Component.map(items, llm="batch")`` against the simulator as a separate process (``genx
sim``): the items' LLM calls travel as one provider batch per round, the run waits holding no
host while it runs, answers come back to the right items, failed requests retry in the next
round, cancel cancels the batch, and a provider without batches says so."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers import SimProcess

from genx_ray import RetryPolicy, component, start, workflow
from genx_ray.llm import AsyncOpenAI
from genx_ray.llm.sim import SimConfig
from genx_ray.model import RunCancelled, RunFailed, RunStatus, UserError
from genx_ray.service import RunHandle
from genx_ray.store import keys, sync_redis

pytestmark = pytest.mark.timeout(120)
MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def sim_process() -> Iterator[SimProcess]:
    sim = SimProcess()
    yield sim
    sim.stop()


@pytest.fixture
def sim(sim_process: SimProcess, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> SimProcess:
    sim_process.configure()
    monkeypatch.setenv("OPENAI_API_KEY", "sim-key")
    monkeypatch.setenv("OPENAI_BASE_URL", f"{sim_process.url}/v1")
    monkeypatch.setenv("GENX_BATCH_POLL_MS", "200")
    monkeypatch.setenv("GENX_BATCH_POLL_MAX_MS", "400")
    monkeypatch.delenv("GENX_LLM_LIMITS", raising=False)
    return sim_process


def _sentence(i: int) -> str:
    return f"Item {i} is number {i}."


async def _ask(text: str) -> str:
    client = AsyncOpenAI()
    response = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}]
    )
    return str(response.choices[0].message.content)


ran: Counter[str] = Counter()


@component(retry=RetryPolicy(max_attempts=2, initial_interval=5.0))
async def summarize(i: int) -> dict[str, Any]:
    ran["summarize"] += 1
    return {"i": i, "answer": await _ask(_sentence(i))}


@component
async def twice(i: int) -> list[str]:
    first = await _ask(_sentence(i))
    return [first, await _ask(f"{first} Then {i} again.")]


@workflow(name="batch-summaries")
async def batch_summaries(n: int, window: str = "24h") -> list[Any]:
    out = await summarize.map(range(n), llm="batch", completion_window=window)
    return [r if isinstance(r, dict) else {"error": str(r)} for r in out]


@workflow(name="batch-twice")
async def batch_twice(n: int) -> list[Any]:
    return await twice.map(range(n), llm="batch")


def _wait_status(h: RunHandle, status: RunStatus, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while h.status is not status:
        assert time.monotonic() < deadline, f"{h.id} is {h.status}, never {status}"
        time.sleep(0.02)


def _map_batches(h: RunHandle) -> list[dict[str, Any]]:
    return [
        e.event.data["batch"]  # type: ignore[union-attr,index]
        for e in h.events(follow=False)
        if e.event.type == "progress" and e.event.kind == "map"  # type: ignore[union-attr]
        and e.event.data.get("batch")  # type: ignore[union-attr]
    ]  # fmt: skip


def test_a_300_item_map_goes_as_one_batch_at_the_batch_price_holding_no_host(
    sim: SimProcess,
) -> None:
    sim.configure(batch_delay_ms=1500)
    ran.clear()
    h = start(batch_summaries, {"n": 300, "window": "24h"})
    _wait_status(h, RunStatus.WAITING)
    run = h.get()
    assert run.waiting is not None and run.waiting.kind == "batch"
    lease = sync_redis(os.environ["GENX_REDIS_URL"]).exists(keys.lease(h.id))
    assert not lease  # parked: no host holds it while the batch runs
    out = h.result(60)
    assert out == [{"i": i, "answer": _sentence(i)} for i in range(300)]
    stats = sim.stats()
    assert stats["batches_created"] == 1 and stats["batch_requests_served"] == 300
    assert stats["served"] == 0  # no online chat call
    (batch,) = sim.batches()
    assert batch["request_counts"]["total"] == 300 and batch["completion_window"] == "24h"
    assert batch["metadata"]["genx_run"] == h.id and batch["metadata"]["genx_round"] == "1"
    usage = h.get().usage
    assert usage is not None and usage["calls"] == 300 and usage["batch_calls"] == 300
    online_price = (usage["prompt_tokens"] * 0.15 + usage["completion_tokens"] * 0.6) / 1e6
    assert usage["cost_usd"] == pytest.approx(online_price * 0.5, rel=1e-6)  # batch_discount
    shown = _map_batches(h)
    assert shown[0]["round"] == 1 and shown[0]["ids"] == [batch["id"]]
    assert shown[-1]["status"] == "completed"
    assert shown[-1]["request_counts"] == {"total": 300, "completed": 300, "failed": 0}
    waits = [e.event for e in h.events(follow=False) if e.event.type == "run.waiting"]
    assert len(waits) >= 3 and all(w.reason == "batch" for w in waits)  # type: ignore[attr-defined]
    # the items ran to collect their calls, then with their answers: a poll (with the key the
    # calls used) looks at the batch without running them again
    assert ran["summarize"] == 600


def test_failed_requests_are_retried_in_a_second_round(sim: SimProcess) -> None:
    sim.configure(batch_fail_next=10)
    h = start(batch_summaries, {"n": 300})
    out = h.result(60)
    assert out == [{"i": i, "answer": _sentence(i)} for i in range(300)]
    stats = sim.stats()
    assert stats["batches_created"] == 2 and stats["batch_requests_failed"] == 10
    assert stats["batch_requests_served"] == 300 and stats["served"] == 0  # 290 + 10 retried
    second, first = sim.batches()  # newest first
    assert first["request_counts"]["total"] == 300 and second["request_counts"]["total"] == 10
    assert second["metadata"]["genx_round"] == "2"
    retried = [e for e in h.events(follow=False) if e.event.type == "step.retrying"]
    assert len(retried) == 10


def test_failed_requests_past_the_retry_policy_are_errors_in_place(sim: SimProcess) -> None:
    sim.configure(batch_error_rate=1.0)  # every batch request fails
    h = start(batch_summaries, {"n": 5})
    out = h.result(60)
    assert [r["error"] for r in out] == [
        f"step /0:summarize.map/{i}:summarize failed after 2 attempt(s): InternalServerError: "
        "Error code: 500 - injected failure" for i in range(5)
    ]  # fmt: skip
    assert sim.stats()["batches_created"] == 2  # the first try, then the retry: two rounds
    assert sim.stats()["served"] == 0


def test_an_item_making_two_sequential_calls_takes_two_rounds(sim: SimProcess) -> None:
    h = start(batch_twice, {"n": 20})
    out = h.result(60)
    assert [o[0] for o in out] == [_sentence(i) for i in range(20)]
    assert all(o[1] for o in out)
    stats = sim.stats()
    assert stats["batches_created"] == 2 and stats["batch_requests_served"] == 40
    assert [b["request_counts"]["total"] for b in sim.batches()] == [20, 20]


def test_cancel_cancels_the_open_batch(sim: SimProcess) -> None:
    sim.configure(batch_delay_ms=20_000)
    h = start(batch_summaries, {"n": 30})
    _wait_status(h, RunStatus.WAITING)
    assert h.cancel() is RunStatus.CANCELLED
    with pytest.raises(RunCancelled):
        h.result(5)
    deadline = time.monotonic() + 10
    while sim.batches()[0]["status"] not in ("cancelling", "cancelled"):
        assert time.monotonic() < deadline, sim.batches()[0]["status"]
        time.sleep(0.05)


def test_a_provider_without_batches_gives_one_clear_error(sim: SimProcess) -> None:
    sim.configure(batches=False)
    h = start(batch_summaries, {"n": 3})
    with pytest.raises(RunFailed) as failed:
        h.result(30)
    message = str(failed.value)
    assert "no Batch API" in message and MODEL in message and 'llm="batch"' in message
    assert h.get().error.type == "BatchUnsupported"  # type: ignore[union-attr]
    assert sim.stats()["served"] == 0  # no online call instead


def test_a_restart_that_finds_the_round_still_creating_looks_the_batch_up_not_again(
    sim: SimProcess,
) -> None:
    """What a crash between ``batches.create`` and noting its id leaves: the round's record
    still ``creating``, its part without an id. The next attempt finds the batch by its
    metadata (batches.list) and makes no other."""
    sim.configure(batch_delay_ms=1500)
    h = start(batch_summaries, {"n": 40})
    _wait_status(h, RunStatus.WAITING)
    redis = sync_redis(os.environ["GENX_REDIS_URL"])
    field = "round:/0:summarize.map"
    record = json.loads(redis.hget(keys.batches(h.id), field))  # type: ignore[arg-type]
    assert record["state"] == "open" and len(record["parts"]) == 1
    redis.hset(keys.batches(h.id), field, json.dumps({**record, "state": "creating",
                                                      "parts": [{}]}))  # fmt: skip
    out = h.result(60)
    assert out == [{"i": i, "answer": _sentence(i)} for i in range(40)]
    assert sim.stats()["batches_created"] == 1 and sim.stats()["batch_requests_served"] == 40
    again = json.loads(redis.hget(keys.batches(h.id), field))  # type: ignore[arg-type]
    assert again["state"] == "read" and again["parts"][0]["id"] == record["parts"][0]["id"]


def test_the_onboarding_example_enriches_through_the_batch_api(sim: SimProcess) -> None:
    from genx_ray.examples import onboard as example

    example._clients.clear()  # its LLM client per loop: one an earlier test made points elsewhere
    onboard = example.onboard
    h = start(onboard, {"max_pages": 3, "questions_per_page": 4, "enrich_via": "batch"})
    report = h.result(60)
    assert report.pages == 3 and report.enrichments == 12 and report.failed == 0
    stats = sim.stats()
    assert stats["batches_created"] == 1 and stats["batch_requests_served"] == 12
    assert stats["served"] == 3 + 1  # only the extractions and the write-up went online


@component(retry=RetryPolicy(max_attempts=2))
async def streamed(i: int) -> str:
    stream = await AsyncOpenAI().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": _sentence(i)}], stream=True
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


@workflow(name="batch-streamed")
async def batch_streamed(n: int) -> list[str]:
    return [str(r) for r in await streamed.map(range(n), llm="batch")]


@workflow(name="batch-misused")
async def batch_misused(how: str) -> str:
    try:
        if how == "placed":
            await summarize.with_resources(num_cpus=1).map(range(2), llm="batch")
        else:
            await summarize.map(range(2), llm=how)  # type: ignore[arg-type]
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_a_streamed_call_cannot_travel_in_a_batch_and_says_so(sim: SimProcess) -> None:
    out = start(batch_streamed, {"n": 2}).result(30)
    assert all("a streamed call cannot travel in a batch" in o for o in out), out
    assert sim.stats()["served"] == 0 and sim.stats()["batches_created"] == 0


def test_misuse_of_llm_batch_is_a_clear_error(sim: SimProcess) -> None:
    assert start(batch_misused, {"how": "placed"}).result(30) == (
        'UserError: summarize.map(llm="batch"): its items run on the run\'s own loop (they '
        "mostly wait for the batch); a placed component or spread=True cannot map in batch mode"
    )
    assert start(batch_misused, {"how": "bulk"}).result(30) == (
        "UserError: map llm must be 'online' or 'batch', not 'bulk'"
    )
    with pytest.raises(UserError, match=r'map\(llm="batch"\) works inside a workflow run'):
        asyncio.run(summarize.map(range(2), llm="batch"))
    assert sim.stats()["served"] == 0


def test_requests_a_batch_never_ran_before_it_expired_are_retried_in_the_next_round(
    sim: SimProcess,
) -> None:
    sim.configure(batch_delay_ms=2000, batch_expire_ms=300)  # the first batch expires unrun
    h = start(batch_summaries, {"n": 10})
    _wait_status(h, RunStatus.WAITING)
    deadline = time.monotonic() + 20
    while sim.batches()[0]["status"] != "expired":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    httpx.post(f"{sim.url}/sim/config", json={**SimConfig(latency_ms=5).model_dump(),
                                              "batch_delay_ms": 300})  # fmt: skip
    out = h.result(60)
    assert out == [{"i": i, "answer": _sentence(i)} for i in range(10)]
    second, first = sim.batches()
    assert first["status"] == "expired" and second["status"] == "completed"
    ran_before = first["request_counts"]["completed"]  # answered before it expired: kept
    assert ran_before < 10 and second["request_counts"]["total"] == 10 - ran_before


def test_a_batch_the_provider_refuses_fails_the_run_with_its_reasons(sim: SimProcess) -> None:
    sim.configure(batch_max_requests=5)  # a provider with a smaller limit per file
    h = start(batch_summaries, {"n": 8})
    with pytest.raises(RunFailed, match=r"the provider failed batch batch_\w+: .*5") as failed:
        h.result(30)
    assert "UserError" in str(failed.value)
    assert sim.stats()["batches_created"] == 1 and sim.stats()["served"] == 0


@component(timeout=0.3)
async def quick(i: int) -> str:
    await asyncio.sleep(0.1 * i)  # the last item calls 0.4 s after the first waits
    return await _ask(_sentence(i))


@workflow(name="batch-quick")
async def batch_quick(n: int) -> list[str]:
    return [str(r) for r in await quick.map(range(n), llm="batch")]


def test_a_component_timeout_does_not_cut_an_item_waiting_for_its_batch(sim: SimProcess) -> None:
    sim.configure(batch_delay_ms=1000)  # the batch, and the round, last beyond the timeout
    assert start(batch_quick, {"n": 5}).result(30) == [_sentence(i) for i in range(5)]
    assert sim.stats()["batches_created"] == 1
