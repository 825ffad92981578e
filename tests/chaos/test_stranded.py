"""A worker killed between taking runs from the queue and starting them: another worker takes
them over as soon as the dead one's heartbeat is stale (never later than the lease), not a fixed
minute later; a live worker, however slow, keeps what it took; no run starts twice."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from genx_ray.model import RunStatus
from genx_ray.store import EventStore, RunQueue, RunStore

from .conftest import TESTS, WorkerFactory

pytestmark = pytest.mark.timeout(240)
LEASE = 6  # the setting: only knowing the death can be quicker than a minute


class _Lines:
    """A process's stderr, read by a thread: waits for a line that says something."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._stream = proc.stderr
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in iter(self._stream.readline, b""):
            with self._cond:
                self.lines.append(raw.decode(errors="replace"))
                self._cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [line for line in self.lines if text in line]
                if hits:
                    return hits[0]
                left = deadline - time.monotonic()
                assert left > 0, f"no line with {text!r}: {self.lines[-20:]}"
                self._cond.wait(left)


@pytest.fixture
def held_worker(redis_url: str) -> Iterator[Any]:
    """A `genx worker --hosts inline` that logs each batch it takes and holds it (never starts
    it: GENX_DEBUG_HOLD_TAKEN), its stderr read line by line."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn() -> tuple[subprocess.Popen[bytes], _Lines]:
        env = {
            **os.environ, "GENX_REDIS_URL": redis_url, "GENX_WORKFLOWS": "wf_fixtures",
            "GENX_LEASE_SECONDS": str(LEASE), "GENX_DEBUG_HOLD_TAKEN": "3600",
            "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
        }  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "genx_ray.cli", "worker", "--hosts", "inline"],
            env=env, start_new_session=True, stderr=subprocess.PIPE,
        )  # fmt: skip
        procs.append(proc)
        return proc, _Lines(proc)

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def test_runs_a_killed_worker_took_but_had_not_started_start_elsewhere_within_the_lease(
    held_worker: Any, spawn_worker: WorkerFactory, runs: RunStore, events: EventStore
) -> None:
    ids = [(await runs.create("phases", {"n": 2, "delay": 0.01}, enqueue=True)).id
           for _ in range(500)]  # fmt: skip
    first, lines = held_worker()
    await asyncio.to_thread(lines.wait_for, "holding them", 60)  # it took a batch, holds it
    second = spawn_worker("--hosts", "inline", GENX_LEASE_SECONDS=str(LEASE))

    first_name = f"{socket.gethostname()}-{first.pid}"

    async def taken_by_first() -> list[str]:
        return [e.run_id for e in await RunQueue(runs.redis).held(first_name)]

    # The second worker starts every run the first did not take; the first, alive, keeps its own
    # for longer than a lease (it is slow, not dead: nobody takes them from it).
    deadline = time.monotonic() + 60
    while sum(r.status is RunStatus.SUCCEEDED for r in await _all(runs, ids)) < 500 - len(
        await taken_by_first()
    ):
        assert time.monotonic() < deadline, "the second worker did not run the rest"
        await asyncio.sleep(0.2)
    await asyncio.sleep(LEASE + 1)
    held = await taken_by_first()
    # It took no more than it could start at once: what its death can strand.
    assert 0 < len(held) <= 128, len(held)
    waiting = [r.id for r in await _all(runs, ids) if r.status is RunStatus.QUEUED]
    assert set(waiting) == set(held)

    killed_at = time.time()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    deadline = time.monotonic() + 60
    while any(r.status is not RunStatus.SUCCEEDED for r in await _all(runs, ids)):
        assert time.monotonic() < deadline, "the held runs did not finish"
        assert second.poll() is None
        await asyncio.sleep(0.2)
    done = await _all(runs, ids)
    assert all(r.attempt == 1 and r.output == 1 for r in done)
    late = [
        (r.started_at.timestamp() - killed_at)  # type: ignore[union-attr]
        for r in done
        if r.id in waiting
    ]
    assert max(late) <= LEASE + 2, sorted(late)[-5:]
    for run_id in ids:  # each started once, each step ran once
        types = [e.type for e in await events.read(run_id)]
        assert types.count("run.started") == 1 and types.count("step.completed") == 2, types


async def _all(runs: RunStore, ids: list[str]) -> list[Any]:
    return list(await asyncio.gather(*(runs.get(r) for r in ids)))
