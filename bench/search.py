"""Finding runs, and acting on many of them, on a private Redis.

- filters over 10,000 runs of one tenant (a tag, two tags, a tag and a status, a status, a time
  range): ``GET /v1/runs``'s search, from the indexes, against a scan of the tenant's index that
  reads each record and filters it (what answered a filter before the indexes), for a page of 50;
- a bulk rerun of 1,000 failed runs from their failed step (``POST /v1/runs/bulk/rerun``, a
  gateway in this process), per run, against creating a run with ``RunStore.create``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any, cast

import httpx

from bench.report import row
from genx_ray.model import (
    DEFAULT_TENANT,
    ErrorInfo,
    JournalEntry,
    Run,
    RunFailedEvent,
    RunStartedEvent,
    RunStatus,
    Settings,
    StepCompletedEvent,
    StepFailedEvent,
    StepRef,
    StepStartedEvent,
)
from genx_ray.store import BatchWriter, Claim, EmbeddedRedis, RunStore, async_redis, keys

N = 10_000
PAGE = 50
RERUNS = 1_000
TENANT = "bench"


async def _seed(runs: RunStore) -> None:
    async def one(i: int) -> None:
        tags = {"customer": "acme" if i % 10 == 0 else f"c{i % 37}"}
        if i % 100 == 0:
            tags["batch"] = "2026-12"
        run = await runs.create("ingest", None, tenant=TENANT, tags=tags)
        if i % 10 == 3:
            await runs.request_cancel(run.id)

    for at in range(0, N, 500):
        await asyncio.gather(*(one(i) for i in range(at, min(N, at + 500))))


async def _scan(redis: Any, tenant: str, keep: Any, limit: int = PAGE, low: str = "-") -> list[Run]:
    """The baseline: the tenant's index newest first, every record read and filtered."""
    out: list[Run] = []
    upper = "+"
    while len(out) < limit:
        ids = cast(list[str], await redis.zrevrangebylex(keys.run_index(tenant), upper, low,
                                                         start=0, num=500))  # fmt: skip
        if not ids:
            break
        async with redis.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.hgetall(keys.run(run_id))
            hashes = await pipe.execute()
        out += [Run.from_hash(h) for h in hashes if h and keep(h)][: limit - len(out)]
        upper = f"({ids[-1]}"
    return out


async def _median(fn: Any, times: int = 7) -> float:
    samples = []
    for _ in range(times):
        t0 = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


async def filters(redis: Any) -> None:
    runs = RunStore(redis)
    t0 = time.perf_counter()
    await _seed(runs)
    print(f"  {N} runs created in {time.perf_counter() - t0:.1f} s", flush=True)
    page, _ = await runs.list(tenant=TENANT, limit=500)
    middle = page[250].created_at.timestamp()
    low = "[" + page[250].id[:14]

    def tagged(h: dict[str, str], **want: str) -> bool:
        tags = json.loads(h.get("tags") or "{}")
        return all(tags.get(k) == v for k, v in want.items())

    cases: list[tuple[str, dict[str, Any], Any, str]] = [
        ("a tag (1 run in 10)", {"tags": [("customer", "acme")]},
         lambda h: tagged(h, customer="acme"), "-"),
        ("two tags (1 in 100)", {"tags": [("customer", "acme"), ("batch", "2026-12")]},
         lambda h: tagged(h, customer="acme", batch="2026-12"), "-"),
        ("a tag and a status (1 in 370)", {"tags": [("customer", "c3")],
                                           "status": RunStatus.CANCELLED},
         lambda h: tagged(h, customer="c3") and h["status"] == "cancelled", "-"),
        ("a status (1 in 10)", {"status": RunStatus.CANCELLED},
         lambda h: h["status"] == "cancelled", "-"),
        ("a time range (the newest 250)", {"created_after": middle}, lambda h: True, low),
    ]  # fmt: skip
    for label, query, keep, scan_low in cases:
        baseline = await _median(lambda k=keep, lo=scan_low: _scan(redis, TENANT, k, low=lo))
        indexed = await _median(lambda q=query: runs.list(tenant=TENANT, limit=PAGE, **q))
        row(f"page of {PAGE}, scan the records: {label}", baseline, unit="ms")
        row(f"page of {PAGE}, from the indexes: {label}", indexed, baseline, unit="ms")


async def _failed_runs(redis: Any, runs: RunStore, n: int) -> None:
    """``n`` failed runs of ``hello`` with a journal and step events: a step done, one failed."""
    writes = BatchWriter(redis)

    async def one() -> None:
        run = await runs.create("hello", {"name": "x"}, tags={"batch": "outage"})
        started = RunStartedEvent(run_id=run.id, workflow="hello")
        await runs.claim_many([Claim(run.id, 1, started, {})], None, watch=False)
        w = writes.writer(run.id, 1, tenant=DEFAULT_TENANT)
        ok, bad = StepRef(id="/0:fetch", name="fetch"), StepRef(id="/1:enrich", name="enrich")
        error = ErrorInfo(type="RuntimeError", message="the provider is down")
        await w.commit(
            [StepStartedEvent(run_id=run.id, step=ok), StepCompletedEvent(run_id=run.id, step=ok),
             StepStartedEvent(run_id=run.id, step=bad),
             StepFailedEvent(run_id=run.id, step=bad, error=error)],
            [("/0:fetch", JournalEntry("fetch", "h", "page").dumps()),
             ("/1:enrich", JournalEntry("enrich", "h", error={"type": "RuntimeError",
                                                              "message": "down"}).dumps())],
        )  # fmt: skip
        await w.finish("failed", RunFailedEvent(run_id=run.id, error=error),
                       {"error": error.model_dump_json()}, leased=False)  # fmt: skip

    for at in range(0, n, 200):
        await asyncio.gather(*(one() for _ in range(min(200, n - at))))
    await writes.close()


async def bulk_rerun(redis: Any, url: str) -> None:
    from gateway.app import create_app

    runs = RunStore(redis)
    await _failed_runs(redis, runs, RERUNS)
    t0 = time.perf_counter()
    for _ in range(RERUNS):
        await runs.create("hello", {"name": "x"})
    baseline = (time.perf_counter() - t0) / RERUNS
    app = create_app(Settings.from_env({"GENX_REDIS_URL": url}), redis_url=url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=600) as c:
            t0 = time.perf_counter()
            body = {"filter": {"tag": "batch:outage", "status": "failed"}, "from": "failed_step"}
            resp = await c.post("/v1/runs/bulk/rerun", json=body)
            spent = (time.perf_counter() - t0) / RERUNS
    result = resp.json()
    assert result["done"] == RERUNS, result
    assert {r["from_step"] for r in result["runs"]} == {"/1:enrich"}
    row("RunStore.create, per run", baseline, unit="ms")
    row(f"bulk rerun of {RERUNS} from their failed step, per run", spent, baseline, unit="ms")


def main() -> None:
    server = EmbeddedRedis()
    url = server.start()
    try:

        async def run() -> None:
            redis = async_redis(url)
            try:
                await filters(redis)
                await bulk_rerun(redis, url)
            finally:
                await redis.aclose()

        asyncio.run(run())
    finally:
        server.stop()


if __name__ == "__main__":
    main()
