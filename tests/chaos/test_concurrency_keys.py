"""A concurrency key (limit 2) over 12 runs of one key and 12 of another, a worker killed in the
middle: never 3 of a key inside at once (counted inside the workflow), the key's count recovers
from the killed runs, and every run finishes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any

import pytest

from genx_ray.model import RunStatus
from genx_ray.store import RunStore, keys

from .conftest import WorkerFactory

pytestmark = pytest.mark.timeout(240)


async def _all(runs: RunStore, ids: list[str]) -> list[Any]:
    return list(await asyncio.gather(*(runs.get(r) for r in ids)))


async def test_a_keys_count_recovers_from_a_killed_worker_and_never_passes_its_limit(
    spawn_worker: WorkerFactory, runs: RunStore
) -> None:
    inline = ("--hosts", "inline")
    first = spawn_worker(*inline)
    tag = f"{time.monotonic_ns()}"
    ids = [
        (await runs.create("keyed", {"user": f"{user}{tag}", "hold": 1.0}, enqueue=True)).id
        for _ in range(12) for user in ("x", "y")
    ]  # fmt: skip
    name = f"{socket.gethostname()}-{first.pid}"
    deadline = time.monotonic() + 60
    while True:  # until the first worker runs some of them (it is alone: it runs 2 of each key)
        workers = await asyncio.gather(*(runs.redis.hget(keys.run(r), "worker") for r in ids))
        mine = [r for r, w in zip(ids, workers, strict=True) if w == name]
        if len(mine) >= 2:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    second = spawn_worker(*inline)
    await asyncio.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # its runs die with it, holding their key's places
    first.wait()
    deadline = time.monotonic() + 120
    while not all(r.status.terminal for r in await _all(runs, ids)):
        assert time.monotonic() < deadline, [r.status for r in await _all(runs, ids)]
        assert second.poll() is None
        await asyncio.sleep(0.2)
    done = await _all(runs, ids)
    assert all(r.status is RunStatus.SUCCEEDED for r in done), [r.error for r in done]
    assert max(r.output for r in done) == 2  # reached, never passed
    assert any(r.attempt == 2 for r in done)  # the killed ones ran again
