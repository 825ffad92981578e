from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

TESTS = os.path.dirname(os.path.dirname(__file__))
WorkerFactory = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn_worker(redis_url: str) -> Iterator[WorkerFactory]:
    """Start `genx worker` processes (each in its own process group, with its own local Ray);
    every one still alive is stopped at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str, **env: str) -> subprocess.Popen[bytes]:
        full_env = {
            **os.environ,
            "GENX_REDIS_URL": redis_url,
            "GENX_WORKFLOWS": "wf_fixtures",
            "GENX_LEASE_SECONDS": "2",
            "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
            **env,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "genx_ray.cli", "worker", *args],
            env=full_env, start_new_session=True, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
