from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

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


def run_script(name: str, redis_url: str, timeout: float) -> tuple[dict[str, Any], str]:
    """Run tests/chaos/<name> (a scenario that needs a Ray cluster of its own) with the tests on
    its path; returns the JSON line it printed last, and its stderr."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, os.path.join(TESTS, "chaos", name), redis_url],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, proc.stderr
