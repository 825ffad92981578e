"""A gateway process (`genx gateway`, real HTTP) under stress: Redis down (every route answers 503
redis_unavailable with Retry-After, an open event stream ends cleanly with a retry hint and
resumes by id afterwards, and the log says once that Redis is gone and once that it is back), and
SIGTERM with event streams open (it exits in seconds instead of waiting for them)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from subprocess import Popen

import httpx
import pytest
from helpers import wait_up

from genx_ray.store import EmbeddedRedis, free_port

TESTS = Path(__file__).resolve().parents[1]
OUTAGE_SECONDS = 8.0  # longer than the hub's 5 s recheck: the open stream meets the outage


@contextmanager
def _gateway(url: str, stderr: int | None = subprocess.DEVNULL) -> Iterator[tuple[str, Popen[str]]]:
    """`genx gateway` on ``url``'s Redis, serving the test workflows; its base URL once healthy."""
    port = free_port()
    env = {**os.environ, "GENX_REDIS_URL": url, "GENX_WORKFLOWS": "wf_fixtures",
           "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    gateway = subprocess.Popen(
        [sys.executable, "-m", "genx_ray.cli", "gateway", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(f"{base}/healthz", gateway)
        yield base, gateway
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()


def test_a_redis_outage_gets_503s_a_clean_stream_end_and_two_log_lines() -> None:
    server = EmbeddedRedis(appendonly=True)
    url = server.start()
    with _gateway(url, stderr=subprocess.PIPE) as (base, gateway):
        # No worker: the run stays queued, its stream open (only run.queued so far).
        run = httpx.post(f"{base}/v1/workflows/echo/runs", json={"input": {"text": "x"}}).json()
        streamed: list[str] = []

        def follow() -> None:
            with httpx.stream("GET", f"{base}/v1/runs/{run['id']}/events", timeout=60) as resp:
                streamed.extend(resp.iter_text())  # raises if the body is cut short

        follower = threading.Thread(target=follow)
        follower.start()
        time.sleep(0.5)
        server.down()
        down_at = time.monotonic()
        time.sleep(1.0)
        during = {
            "run": httpx.get(f"{base}/v1/runs/{run['id']}"),
            "list": httpx.get(f"{base}/v1/runs"),
            "start": httpx.post(f"{base}/v1/workflows/echo/runs", json={"input": {"text": "y"}}),
            "events": httpx.get(f"{base}/v1/runs/{run['id']}/events", timeout=10),
            "healthz": httpx.get(f"{base}/healthz"),
        }
        for name, resp in during.items():
            assert resp.status_code == 503, (name, resp.text)
            assert resp.json()["error"]["code"] == "redis_unavailable", name
            assert resp.headers["Retry-After"] == "2", name
        follower.join(30)
        assert not follower.is_alive()
        text = "".join(streamed)
        assert text.startswith("retry: 1000\n\nid: ") and "event: run.queued" in text
        assert text.endswith("retry: 2000\n: redis unavailable\n\n")  # a clean end, then back
        last_id = [line[4:] for line in text.splitlines() if line.startswith("id: ")][-1]
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
        server.start()  # from this thread: the server dies with the thread that started it
        time.sleep(1.0)  # the probe sees Redis again
        again = httpx.get(f"{base}/v1/runs/{run['id']}")
        assert again.status_code == 200 and again.json()["status"] == "queued", again.text
        with httpx.stream("GET", f"{base}/v1/runs/{run['id']}/events", timeout=3,
                          headers={"Last-Event-ID": last_id}) as resp:  # fmt: skip
            assert resp.status_code == 200
            chunks: list[str] = []
            with pytest.raises(httpx.ReadTimeout):  # nothing new, nothing repeated: it waits
                chunks.extend(resp.iter_text())
            assert chunks == ["retry: 1000\n\n"]
        assert httpx.post(f"{base}/v1/runs/{run['id']}/cancel").status_code == 200
        gateway.terminate()
        _, err = gateway.communicate(timeout=30)
    server.stop()
    gone = [line for line in err.splitlines() if "Redis unavailable" in line]
    back = [line for line in err.splitlines() if "Redis is back" in line]
    assert len(gone) == 1 and len(back) == 1, err
    assert "Traceback" not in err, err


def test_sigterm_with_an_event_stream_open_stops_the_gateway_in_seconds() -> None:
    server = EmbeddedRedis()
    with _gateway(server.start()) as (base, gateway):
        run = httpx.post(f"{base}/v1/workflows/echo/runs", json={"input": {"text": "x"}}).json()

        def follow() -> None:  # no worker: the stream stays open until the gateway goes
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"{base}/v1/runs/{run['id']}/events", timeout=60)

        threading.Thread(target=follow, daemon=True).start()
        time.sleep(0.5)
        gateway.terminate()
        started = time.monotonic()
        gateway.wait(20)
        assert time.monotonic() - started < 10  # GRACEFUL_SHUTDOWN_SECONDS, then it closes them
    server.stop()
