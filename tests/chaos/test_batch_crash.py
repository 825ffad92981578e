"""``map(llm="batch")`` across real worker processes that die: a worker killed while its run
waits for the provider's batch, and another killed while the run reads the batch's output; the
batch is created once per round and every item gets its own answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from helpers import SimProcess

from genx_ray.model import RunStatus
from genx_ray.store import EventStore, RunStore, keys

from .conftest import WorkerFactory
from .test_crash import _finished, _ready, _until
from .test_waits import _kill, _runs_on_hosts, _status

pytestmark = pytest.mark.timeout(300)
N = 300


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimProcess]:
    sim = SimProcess()
    monkeypatch.setenv("OPENAI_API_KEY", "sim-key")
    monkeypatch.setenv("OPENAI_BASE_URL", f"{sim.url}/v1")
    monkeypatch.setenv("GENX_BATCH_POLL_MS", "100")
    monkeypatch.setenv("GENX_BATCH_POLL_MAX_MS", "200")
    monkeypatch.delenv("GENX_LLM_LIMITS", raising=False)
    yield sim
    sim.stop()


async def test_workers_killed_waiting_for_the_batch_and_reading_it_leave_one_batch(
    spawn_worker: WorkerFactory, runs: RunStore, events: EventStore, sim: SimProcess
) -> None:
    sim.configure(batch_delay_ms=4000, file_delay_ms=3000)  # the output takes 3 s to read
    first = spawn_worker()
    await _ready(runs, first)
    run = await runs.create("batch-enrich", {"n": N}, enqueue=True)
    await _status(runs, run.id, RunStatus.WAITING)
    assert sim.stats()["batches_created"] == 1
    _kill(first)  # killed while the run waits for its batch
    await asyncio.sleep(1)
    assert await _runs_on_hosts(runs, killed=first) == 0  # the waiting run is in Redis only
    second = spawn_worker()
    await _ready(runs, second)

    async def batch_done() -> bool:
        return bool(sim.batches()[0]["status"] == "completed")

    await _until(batch_done, within=60, every=0.05)

    async def reading() -> bool:  # the attempt that found the batch done downloads its output
        return bool(sim.stats()["files_read"] >= 1)

    await _until(reading, within=30, every=0.02)
    _kill(second)  # killed while it reads the output: nothing of it was journaled
    record = json.loads(await runs.redis.hget(keys.batches(run.id), "round:/0:batch_summary.map"))
    assert record["state"] == "open"
    spawn_worker()
    (done,) = await _finished(runs, events, [run.id])
    assert done.status is RunStatus.SUCCEEDED
    assert done.output == [f"Item {i} is number {i}." for i in range(N)]
    stats = sim.stats()
    assert stats["batches_created"] == 1 and stats["batch_requests_served"] == N
    assert stats["served"] == 0  # never an online call
    assert stats["files_read"] == 2  # the output read again by the next worker, once
    assert done.usage is not None and done.usage["batch_calls"] == N  # booked once
