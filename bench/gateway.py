"""The API plane under load, against bare redis-py in the same run.

- delivery latency, append -> client, with 200 concurrent SSE clients on one gateway process,
  against 200 bare ``XREAD BLOCK`` loops (one connection each);
- replay throughput of one run's stored events, against a bare ``XRANGE`` paging loop;
- start latency: ``POST /v1/workflows/hello/runs`` to the client seeing ``run.started``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import httpx

from bench.stack import bench_env, pct, stack
from genx_ray.model import RunStatus
from genx_ray.model import events as ev
from genx_ray.store import EventStore, RunStore, async_redis, keys, resolve_redis_url

CLIENTS = 200
ROUNDS = 20
REPLAY_EVENTS = 20_000


async def _running_runs(store: RunStore, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        run = await store.create("bench", None)
        await store.transition(run.id, RunStatus.RUNNING, allowed={RunStatus.QUEUED})
        ids.append(run.id)
    return ids


async def _publish_rounds(events: EventStore, run_ids: list[str]) -> None:
    for _ in range(ROUNDS):
        await asyncio.sleep(0.05)
        async with events.redis.pipeline(transaction=False) as pipe:
            for rid in run_ids:
                event = ev.ProgressEvent(run_id=rid, kind="t", data=time.time())
                pipe.xadd(keys.events(rid), {"t": event.type, "e": ev.dump_event(event)})
            await pipe.execute()


async def sse_latency(base: str, store: RunStore, events: EventStore) -> list[float]:
    run_ids = await _running_runs(store, CLIENTS)
    latencies: list[float] = []
    ready = asyncio.Event()
    connected = 0

    async def client(http: httpx.AsyncClient, rid: str) -> None:
        nonlocal connected
        got = 0
        async with http.stream("GET", f"/v1/runs/{rid}/events") as resp:
            connected += 1
            if connected == CLIENTS:
                ready.set()
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    data = json.loads(line[5:])
                    if data["type"] == "progress":
                        latencies.append(time.time() - data["data"])
                        got += 1
                        if got == ROUNDS:
                            return

    limits = httpx.Limits(max_connections=CLIENTS + 10)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        tasks = [asyncio.create_task(client(http, rid)) for rid in run_ids]
        await asyncio.wait_for(ready.wait(), 60)
        await asyncio.sleep(0.5)  # let every client finish its replay and join the hub
        await _publish_rounds(events, run_ids)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return latencies


async def bare_latency(redis_url: str, store: RunStore, events: EventStore) -> list[float]:
    run_ids = await _running_runs(store, CLIENTS)
    latencies: list[float] = []
    clients = [async_redis(redis_url) for _ in run_ids]  # XREAD BLOCK holds a connection each

    starts = {rid: (await events.read(rid))[-1].id for rid in run_ids}

    async def reader(client: Any, rid: str) -> None:
        last, got = starts[rid], 0
        while got < ROUNDS:
            resp = await client.xread({keys.events(rid): last}, block=1000)
            for _, entries in resp or ():
                for entry_id, fields in entries:
                    last = entry_id
                    latencies.append(time.time() - json.loads(fields["e"])["data"])
                    got += 1

    tasks = [asyncio.create_task(reader(c, r)) for c, r in zip(clients, run_ids, strict=True)]
    await asyncio.sleep(0.5)
    await _publish_rounds(events, run_ids)
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    for c in clients:
        await c.aclose()
    return latencies


async def replay(base: str, store: RunStore, events: EventStore) -> tuple[float, float]:
    (rid,) = await _running_runs(store, 1)
    batch = [ev.ProgressEvent(run_id=rid, kind="k", data={"i": i}) for i in range(1000)]
    for _ in range(REPLAY_EVENTS // 1000):
        await events.append(rid, *batch)
    await store.transition(rid, RunStatus.SUCCEEDED, allowed={RunStatus.RUNNING},
                           event=ev.RunSucceededEvent(run_id=rid))  # fmt: skip
    t0 = time.perf_counter()
    n, tail = 0, b""
    async with (
        httpx.AsyncClient(base_url=base, timeout=120) as http,
        http.stream("GET", f"/v1/runs/{rid}/events") as resp,
    ):
        # Frames are counted in the raw bytes: the figure is the server's, not the cost of a
        # client parsing lines (httpx's line iterator costs more than the gateway here).
        async for chunk in resp.aiter_raw():
            data = tail + chunk
            n += data.count(b"\ndata: ")
            tail = data[-8:]
            n -= tail.count(b"\ndata: ")
    sse_rate = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    m, last = 0, "0-0"
    while True:
        page = await events.read(rid, last, count=1000)
        if not page:
            break
        m += len(page)
        last = page[-1].id
    return sse_rate, m / (time.perf_counter() - t0)


async def start_latency(base: str) -> list[float]:
    out = []
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        for _ in range(20):
            t0 = time.perf_counter()
            async with http.stream(
                "POST", "/v1/workflows/hello/runs", json={"input": {}},
                headers={"Accept": "text/event-stream"},
            ) as resp:  # fmt: skip
                async for line in resp.aiter_lines():
                    if line == "event: run.started":
                        out.append(time.perf_counter() - t0)
                        break
    return out


async def run(base: str, redis_url: str) -> None:
    client = async_redis(redis_url)
    store, events = RunStore(client, retention_seconds=600), EventStore(client)
    bare = await bare_latency(redis_url, store, events)
    sse = await sse_latency(base, store, events)
    ms = 1e3
    print(f"  delivery latency, {CLIENTS} clients x {ROUNDS} events (append -> client):")
    print(f"    bare redis-py XREAD loops ({CLIENTS} connections)  p50 {pct(bare, 50) * ms:7.1f} ms"
          f"   p99 {pct(bare, 99) * ms:7.1f} ms")  # fmt: skip
    print(f"    SSE through one gateway process (1 hub conn)   p50 {pct(sse, 50) * ms:7.1f} ms"
          f"   p99 {pct(sse, 99) * ms:7.1f} ms")  # fmt: skip
    sse_rate, bare_rate = await replay(base, store, events)
    print(
        f"  replay of {REPLAY_EVENTS} stored events: SSE {sse_rate:,.0f} events/s;"
        f" bare XRANGE paging {bare_rate:,.0f} events/s (x{bare_rate / sse_rate:.1f})"
    )
    starts = await start_latency(base)
    print(
        f"  start latency (POST -> run.started seen by the client), 20 sequential runs:"
        f" p50 {statistics.median(starts) * ms:.1f} ms, max {max(starts) * ms:.1f} ms"
    )
    await client.aclose()


def main() -> None:
    redis_url = resolve_redis_url()
    with stack(bench_env(redis_url, "genx_ray.examples")) as (base, _):
        asyncio.run(run(base, redis_url))


if __name__ == "__main__":
    main()
