"""What the whole-stack benchmarks share: starting the processes, waiting for them, and reading
what each process spent (CPU, memory) off /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from genx_ray.store import free_port

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "genx_ray.cli"]


def bench_env(redis_url: str, workflows: str, **extra: str) -> dict[str, str]:
    """The environment of a benchmark's processes: its Redis, its workflows, this checkout."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ, "GENX_REDIS_URL": redis_url, "GENX_WORKFLOWS": workflows,
        "PYTHONPATH": path, **extra,
    }  # fmt: skip


def wait_healthy(base: str, timeout: float = 60, path: str = "/healthz") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}{path}", timeout=1).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base} did not become healthy")


@contextmanager
def stack(
    env: Mapping[str, str], *, worker_args: tuple[str, ...] = (), worker: bool = True
) -> Iterator[tuple[str, dict[str, subprocess.Popen[bytes]]]]:
    """A gateway and (unless told not to) a worker, as separate processes; yields the API's
    base URL and the processes by role. Stopped with SIGTERM at the end."""
    port = free_port()
    procs = {"gateway": subprocess.Popen([*CLI, "gateway", "--port", str(port)], env=dict(env))}
    if worker:
        procs["worker"] = subprocess.Popen(
            [*CLI, "worker", *worker_args], env=dict(env), stderr=subprocess.DEVNULL
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        yield base, procs
    finally:
        stop(procs.values())


def stop(procs: object) -> None:
    running = list(procs)  # type: ignore[call-overload]
    for p in running:
        p.send_signal(signal.SIGTERM)
    for p in running:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _status(pid: int, field: str) -> float:
    """A memory figure (MB) of /proc/<pid>/status: VmRSS now, VmHWM its peak."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mb(pid: int) -> float:
    return _status(pid, "VmRSS")


def peak_mb(pid: int) -> float:
    return _status(pid, "VmHWM")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (every process, the kernel too)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def memory_in_use_mb() -> float:
    """The machine's memory in use: total minus available."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f if ":" in line}
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def processes(marker: str) -> list[int]:
    """The pids of processes whose command line starts with ``marker`` (Ray names its actor
    processes ``ray::<Class>``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if cmdline.startswith(marker):
                pids.append(int(entry.name))
    return pids


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


@contextmanager
def simulator(env: Mapping[str, str], port: int, latency_ms: int = 100) -> Iterator[Any]:
    """``genx sim`` on ``port`` (its own process), once it answers; stopped at the end."""
    sim = subprocess.Popen([*CLI, "sim", "--port", str(port), "--latency-ms", str(latency_ms)],
                           env=dict(env))  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}", path="/sim/stats")
        yield sim
    finally:
        sim.terminate()
        sim.wait(10)
