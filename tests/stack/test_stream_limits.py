"""Event streams cannot be turned against the gateway (issue #23, point 4): at most
GENX_MAX_STREAMS_PER_TENANT open streams per tenant on a gateway (a run token's counting against
its run's tenant), and a client that does not read is cut off with a ``retry:`` hint instead of
being buffered without limit; it resumes by id and loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from helpers import wait_up

from gateway.hub import EventHub, RawEntry, SlowReader
from gateway.sse import _body
from genx_ray.store import START, RunStore, async_redis, free_port, keys

from .test_processes import _env

KEYS = {"acme": "acme-key-0123456789ab", "globex": "globex-key-0123456789"}
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Iterator[str]:
    """A real `genx gateway` (no worker: the runs stay queued, their streams stay open)."""
    env = _env(redis_url, GENX_API_KEYS=",".join(f"{k}:{t}" for t, k in KEYS.items()))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "genx_ray.cli", "gateway", "--port", str(port)], env=env,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(f"{url}/healthz", proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


async def test_the_1001st_stream_of_a_tenant_is_refused_and_a_closed_one_frees_its_slot(
    gateway: str, runs: RunStore
) -> None:
    run = await runs.create("echo", {"text": "held open"}, tenant="acme")  # no worker: open
    theirs = await runs.create("echo", {"text": "theirs"}, tenant="globex")
    limits = httpx.Limits(max_connections=1200, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=gateway, limits=limits, timeout=30) as http:
        minted = await http.post(f"/v1/runs/{run.id}/tokens", json={}, headers=_auth("acme"))
        token = minted.json()["token"]
        events = f"/v1/runs/{run.id}/events"
        async with contextlib.AsyncExitStack() as streams:

            async def open_one(**kw: Any) -> httpx.Response:
                return await streams.enter_async_context(http.stream("GET", events, **kw))

            opened = [await open_one(params={"token": token})]  # a token counts for acme too
            for _ in range(9):  # 999 more with the API key: 1,000 open, the limit
                opened += await asyncio.gather(*(open_one(headers=_auth("acme"))
                                                 for _ in range(111)))  # fmt: skip
            assert [r.status_code for r in opened] == [200] * 1000
            refused = await http.get(events, params={"token": token})
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "stream_limit"
            assert int(refused.headers["retry-after"]) >= 1
            assert "GENX_MAX_STREAMS_PER_TENANT" in refused.json()["error"]["message"]
            assert (await http.get(events, headers=_auth("acme"))).status_code == 429
            # Another tenant is not held back by acme's streams.
            async with http.stream("GET", f"/v1/runs/{theirs.id}/events",
                                   headers=_auth("globex")) as other:  # fmt: skip
                assert other.status_code == 200
            # A stream that ends gives its slot back.
            await opened[-1].aclose()
            deadline = time.monotonic() + 10
            while True:
                async with http.stream("GET", events, headers=_auth("acme")) as again:
                    if again.status_code == 200:
                        break
                assert time.monotonic() < deadline, "the closed stream's slot never came back"
                await asyncio.sleep(0.1)
        await runs.request_cancel(run.id)
        await runs.request_cancel(theirs.id)


async def test_a_client_that_does_not_read_is_cut_off_and_resumes_losing_nothing(
    redis_url: str, runs: RunStore
) -> None:
    raw = async_redis(redis_url, decode=False)
    hub = EventHub(raw, max_queued=50)
    await hub.start()
    try:
        run = await runs.create("echo", {"text": "x"})  # stays queued: the stream stays open
        stream = hub.stream(run.id, START)
        body = _body(_seen(stream, got := []), sse=True)
        assert (await anext(body)).startswith(b"retry: ")
        first = await anext(body)  # the replay: run.queued
        assert b"run.queued" in first
        for i in range(400):  # the run goes on emitting; the client reads nothing meanwhile
            event = {"type": "progress", "run_id": run.id, "ts": time.time(), "kind": "n",
                     "data": i}  # fmt: skip
            await runs.redis.xadd(keys.events(run.id), {"t": "progress", "e": json.dumps(event)})

        async def cut_off() -> bool:
            subs = hub._subs.get(run.id, set())
            return any(s.overflowed for s in subs) or not subs

        deadline = time.monotonic() + 10
        while not await cut_off():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert all(s.queued <= 50 for s in hub._subs.get(run.id, set()))  # bounded, not 400
        rest = [chunk async for chunk in body]
        assert rest[-1].startswith(b"retry: ") and b"resume" in rest[-1]  # the hint, then the end
        # Resuming after the last id it got, the client misses nothing.
        last = got[-1].id.decode()
        resumed, _ = await hub.read(run.id, last)
        numbers = [json.loads(e.data)["data"] for e in [*got, *resumed] if e.type == b"progress"]
        assert numbers == list(range(400))
        await runs.request_cancel(run.id)
    finally:
        await hub.stop()
        await raw.aclose()


async def _seen(
    stream: AsyncIterator[list[RawEntry]], got: list[RawEntry]
) -> AsyncIterator[list[RawEntry]]:
    """The stream's batches, each one also noted in ``got`` (what the client was written)."""
    try:
        async for batch in stream:
            got += batch
            yield batch
    except SlowReader:
        raise
