"""Worker operations in-process: webhooks, blue/green deployments, the cluster-wide run cap."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import wf_fixtures  # noqa: F401 - registers the test workflows
from helpers import serving

from genx_ray.model import RunStatus
from genx_ray.service import sign
from genx_ray.store import EventStore, RunQueue, RunStore, free_port, keys


async def _finish(events: EventStore, run_id: str) -> None:
    async for _ in events.follow(run_id):
        pass


class _Receiver(BaseHTTPRequestHandler):
    """Records every delivery; answers 500 to the first delivery of each run in ``fail_first``
    (the worker may also end runs other tests left queued in this session's Redis: their
    notices arrive here too, and must not take the 500 meant for the run under test)."""

    fail_first: set[str] = set()
    got: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).got.append((dict(self.headers), body))
        run_id = json.loads(body).get("id")
        failing = run_id in type(self).fail_first
        type(self).fail_first.discard(run_id)
        self.send_response(500 if failing else 200)
        self.end_headers()

    @classmethod
    def of(cls, run_id: str) -> list[tuple[dict[str, str], bytes]]:
        """The deliveries of one run."""
        return [(h, b) for h, b in cls.got if json.loads(b).get("id") == run_id]

    def log_message(self, *args: Any) -> None:
        pass


async def test_webhook_is_signed_and_retried(
    redis_url: str, runs: RunStore, events: EventStore
) -> None:
    port = free_port()
    server = HTTPServer(("127.0.0.1", port), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Receiver.got = []
    try:
        async with serving(redis_url, webhook_url=f"http://127.0.0.1:{port}/hook",
                           webhook_secret="s3cret") as w:  # fmt: skip
            w.webhooks.initial_delay = 0.05
            run = await runs.create("echo", {"text": "hook"}, enqueue=False)
            _Receiver.fail_first = {run.id}
            await runs.enqueue(run.id, 1, "echo")
            await _finish(events, run.id)
            deadline = time.monotonic() + 10
            while len(_Receiver.of(run.id)) < 2 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        server.shutdown()
    assert len(_Receiver.of(run.id)) == 2  # a 500, then delivered
    headers, body = _Receiver.of(run.id)[-1]
    assert headers["X-Genx-Signature"] == sign("s3cret", headers["X-Genx-Timestamp"], body)
    assert headers["X-Genx-Event"] == "run.succeeded"
    sent = json.loads(body)
    assert sent["id"] == run.id and sent["output"] == "HOOK" and sent["status"] == "succeeded"


async def test_a_malformed_outbox_entry_is_dropped_and_the_sender_goes_on(
    redis_url: str, runs: RunStore, events: EventStore, redis: Any
) -> None:
    """One bad entry (it names no run) must not stop every later run's webhook (#23 §1)."""
    port = free_port()
    server = HTTPServer(("127.0.0.1", port), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Receiver.fail_first, _Receiver.got = set(), []
    try:
        async with serving(redis_url, webhook_url=f"http://127.0.0.1:{port}/hook",
                           webhook_secret="s3cret") as w:  # fmt: skip
            w.webhooks.initial_delay = 0.05
            await redis.xadd(keys.WEBHOOKS, {"not-a-run": "x"})  # poison, first in line
            run = await runs.create("echo", {"text": "after"}, enqueue=True)
            await _finish(events, run.id)

            def delivered() -> bool:
                return any(json.loads(body)["id"] == run.id for _, body in _Receiver.got)

            deadline = time.monotonic() + 10
            while not delivered() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        server.shutdown()
    assert delivered()


async def test_blue_green_old_runs_stay_on_their_deployment_until_it_drains(
    redis_url: str, runs: RunStore, events: EventStore, redis: Any
) -> None:
    async def stamped(version: str) -> str:
        run = await runs.create("echo", {"text": version})
        await redis.hset(keys.run(run.id), "version", version)  # handed back by a `version` host
        await RunQueue(redis).put(run.id, tenant="default")  # no attempt: the worker reads it
        return run.id

    def ran_on(run_id: str) -> Callable[[], Any]:
        return lambda: redis.hget(keys.run(run_id), "worker")

    async def listed(*names: str) -> None:
        while not all([await redis.hexists(keys.WORKERS, n) for n in names]):  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async with serving(redis_url, deployment="blue") as blue, \
            serving(redis_url, deployment="green") as green:  # fmt: skip
        await listed(blue.name, green.name)  # both announced
        old = [await stamped("blue") for _ in range(4)]
        for run_id in old:
            await _finish(events, run_id)
            assert await ran_on(run_id)() == blue.name  # green left them to blue
        blue.stop()  # blue drains: what it leaves behind is adopted
        while await redis.hexists(keys.WORKERS, blue.name):  # noqa: ASYNC110 - gone once drained
            await asyncio.sleep(0.02)
        orphan = await stamped("blue")
        await _finish(events, orphan)
        assert await ran_on(orphan)() == green.name
        assert await redis.hget(keys.run(orphan), "version") == "green"


async def test_cluster_wide_cap_on_running_runs(
    redis_url: str, runs: RunStore, redis: Any, events: EventStore
) -> None:
    peak = 0

    async def watch(stop: asyncio.Event) -> None:
        nonlocal peak
        while not stop.is_set():
            running = sum([
                await redis.hget(keys.run(r), "status") == "running" for r in ids
            ])  # fmt: skip
            peak = max(peak, running)
            await asyncio.sleep(0.01)

    # Only this test's runs count: runs earlier tests left queued, or taken by a worker they
    # killed (pending, so claimable), and leases their killed hosts left (live for 30 s here)
    # would take slots of the cap.
    await redis.delete(*[k async for k in redis.scan_iter(match="{genx:queue}*")], keys.LEASES)
    async with serving(redis_url, max_running=2) as _, serving(redis_url, max_running=2) as _:
        ids = [
            (await runs.create("ticker", {"n": 6, "delay": 0.1}, enqueue=True)).id for _ in range(6)
        ]
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        for run_id in ids:
            await _finish(events, run_id)
        stop.set()
        await watcher
    assert peak == 2
    assert [(await runs.get(r)).status for r in ids] == [RunStatus.SUCCEEDED] * len(ids)
    # The runs that waited for a slot said why, once each, before they started.
    told = []
    for run_id in ids[2:]:
        seq = [(e.type, getattr(e.event, "reason", None)) for e in await events.read(run_id)]
        assert seq[0] == ("run.queued", None) and seq.count(("run.queued", "max_running")) <= 1
        if ("run.queued", "max_running") in seq:
            assert seq.index(("run.queued", "max_running")) < seq.index(("run.started", None))
            told.append(run_id)
    assert told, "no run said it waited for GENX_MAX_RUNNING"
