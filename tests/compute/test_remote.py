"""Components placed on Ray run as Ray tasks, with the same retry, journal and event semantics."""

from __future__ import annotations

import contextlib
import os

import pytest
from helpers import step_events

from genx_ray import RetryPolicy, RunFailed, component, start, workflow


@component(num_cpus=0, retry=RetryPolicy(max_attempts=2, initial_interval=0))
def where(marker: str) -> int:
    # Fails on its first attempt in each process that sees a new marker file: a real retry.
    path = f"/tmp/genx-test-{marker}"
    if not os.path.exists(path):
        open(path, "w").close()
        raise RuntimeError("first attempt fails")
    return os.getpid()


@component(remote=True)
async def async_remote(x: int) -> dict[str, int]:
    return {"pid": os.getpid(), "x": x * 3}


@component(remote=True)
def boom() -> None:
    raise KeyError("missing thing")


@workflow(name="remote-steps")
async def remote_steps(marker: str) -> list[int]:
    pid = await where(marker)
    out = await async_remote(7)
    return [pid, out["pid"], out["x"]]


@workflow(name="remote-boom")
async def remote_boom() -> None:
    await boom()


def test_ray_task_components(ray_local: None, tmp_path: object) -> None:
    marker = f"{os.getpid()}-{id(tmp_path)}"
    h = start(remote_steps, {"marker": marker})
    pid, pid2, x = h.result(60)
    assert pid != os.getpid() and pid2 != os.getpid() and x == 21
    (retry,) = step_events(h, "step.retrying")
    assert retry.step.id == "/0:where" and retry.error.type == "RuntimeError"
    assert [e.step.id for e in step_events(h, "step.completed")] == ["/0:where", "/1:async_remote"]
    os.unlink(f"/tmp/genx-test-{marker}")


def test_ray_task_errors_keep_their_type(ray_local: None) -> None:
    h = start(remote_boom)
    with pytest.raises(RunFailed):
        h.result(60)
    (failed,) = step_events(h, "step.failed")
    assert failed.error.type == "KeyError" and "missing thing" in failed.error.message


@component(remote=True)
def long_task(marker: str) -> None:
    import time

    open(f"/tmp/genx-test-started-{marker}", "w").close()
    try:
        for _ in range(600):  # Ray stops a running task between two bytecodes: short sleeps
            time.sleep(0.1)
            os.utime(f"/tmp/genx-test-started-{marker}")  # still running
    except BaseException:  # how Ray stops a task it cancels: an exception raised in it
        open(f"/tmp/genx-test-interrupted-{marker}", "w").close()
        raise


@workflow(name="remote-cancel")
async def remote_cancel(marker: str) -> None:
    await long_task(marker)


def test_cancel_stops_in_flight_ray_work(ray_local: None) -> None:
    import time

    from genx_ray.model import RunStatus

    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    h = start(remote_cancel, {"marker": marker})
    deadline = time.monotonic() + 30
    while not os.path.exists(f"/tmp/genx-test-started-{marker}"):  # the Ray task is running
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    h.cancel()
    while not h.status.terminal:
        time.sleep(0.02)
    assert h.status is RunStatus.CANCELLED and time.monotonic() - t0 < 1.0

    def stopped() -> bool:  # interrupted (an exception in it), or its process killed (forced)
        started = f"/tmp/genx-test-started-{marker}"
        return os.path.exists(f"/tmp/genx-test-interrupted-{marker}") or (
            time.time() - os.path.getmtime(started) > 1.0
        )

    deadline = time.monotonic() + 15  # a cancel, then a forced one after 5 s
    while not stopped():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for name in ("started", "interrupted"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/tmp/genx-test-{name}-{marker}")
