"""The embedded Redis: started only when nothing answers and no URL was named, stopped after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from genx_ray.model import RedisUnavailable, Settings
from genx_ray.store import EmbeddedRedis, free_port, ping, resolve_redis_url

SCRIPT = """
import json, os
from genx_ray.store import connections
from genx_ray.model import Settings
url = connections.resolve_redis_url(Settings(redis_url={closed!r}, redis_url_explicit=False))
r = connections.sync_redis(url); r.set("k", "v")
print(json.dumps({{"url": url, "pid": connections._embedded.pid,
                  "env": os.environ["GENX_REDIS_URL"], "value": r.get("k")}}))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone as a server.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_embedded_starts_when_nothing_answers_and_stops_with_its_process() -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(closed=closed)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["url"] != closed and out["env"] == out["url"] and out["value"] == "v"
    assert "started a private Redis" in proc.stderr  # the user is told which Redis is used
    deadline = time.monotonic() + 5
    while _alive(out["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(out["pid"])
    assert ping(out["url"], timeout=0.2) is not None


def test_embedded_dies_with_a_killed_parent() -> None:
    code = (
        SCRIPT.format(closed=f"redis://127.0.0.1:{free_port()}/0") + "\nimport time; time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pid = json.loads(proc.stdout.readline())["pid"]
    proc.kill()  # kill -9: no atexit runs
    proc.wait()
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_an_explicit_url_that_does_not_answer_is_a_clear_error() -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnavailable) as info:
        resolve_redis_url(Settings(redis_url=closed, redis_url_explicit=True))
    assert closed in str(info.value)


def test_an_answering_url_is_used_as_is(redis_url: str) -> None:
    assert resolve_redis_url(Settings(redis_url=redis_url, redis_url_explicit=True)) == redis_url


def test_context_manager() -> None:
    with EmbeddedRedis() as url:
        assert ping(url) is None
    assert ping(url, timeout=0.2) is not None


def test_a_redis_of_someone_else_on_the_port_is_never_taken_for_ours() -> None:
    """Two sessions starting at once may probe the same free port: the one whose server lost the
    bind must not go on with the other's Redis (it would share its queues)."""
    from genx_ray.store import find_redis_server, sync_redis

    port = free_port()
    other = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ours = EmbeddedRedis(port=port)
    try:
        deadline = time.monotonic() + 10
        while ping(f"redis://127.0.0.1:{port}/0") is not None:  # until the other one answers
            assert time.monotonic() < deadline
            time.sleep(0.02)
        url = ours.start()
        assert url != f"redis://127.0.0.1:{port}/0"  # it moved on to a port of its own
        assert sync_redis(url).info("server")["process_id"] == ours.pid
    finally:
        ours.stop()
        other.kill()
        other.wait()
