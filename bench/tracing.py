"""What tracing costs: the batch benchmark's 1000 LLM calls x 100 ms (cap 64, the default map)
through the whole stack with tracing off, then with every process exporting its spans over
OTLP/HTTP to a local collector (the default sampler: every span). Each stack's figure is taken
against plain asyncio in the same stretch of time (median of 5, interleaved), so drift between
the two stretches cancels out; the cost is the ratio of the two ratios. Besides, the CPU the
stack's processes spent per map (the gateway, the worker and every process under it: run hosts,
map actors, Ray's own), off and on: on this 2-core machine shared with other work, wall times
move by +-10% with the load, CPU seconds much less, so the CPU figure shows what tracing costs
even when the wall-time one drowns in noise.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench.batch import LIMITS, plain, through_gateway
from bench.stack import bench_env, cpu_seconds, simulator, stack
from genx_ray.client import Client
from genx_ray.store import free_port, resolve_redis_url

CALLS, ROUNDS = 1000, 5


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that takes every export (and counts its bytes), as a collector
    next to the processes would."""

    received = 0
    exports = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received += len(body)
        type(self).exports += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def collector() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _tree(roots: list[int]) -> list[int]:
    """``roots`` and every process under them (Ray's processes are the worker's children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def stretch(env: dict[str, str], base_url: str) -> tuple[float, float, float]:
    """Median wall time of the map through the stack, of plain asyncio meanwhile, and the
    median CPU seconds the stack's processes spent on one map."""
    ours: list[float] = []
    baseline: list[float] = []
    cpu: list[float] = []
    with stack(env) as (base, procs):
        api = Client(base, timeout=120)
        through_gateway(api, "bench-batch", {"n": 64, "model": "gpt-4o-mini", "path": "auto"}, 64)
        for _ in range(ROUNDS):
            baseline.append(asyncio.run(plain(base_url, CALLS, "gpt-4o-mini")))
            body = {"n": CALLS, "model": "gpt-4o-mini", "path": "auto"}
            pids = _tree([p.pid for p in procs.values()])
            before = sum(map(cpu_seconds, pids))
            ours.append(through_gateway(api, "bench-batch", body, CALLS))
            cpu.append(sum(map(cpu_seconds, pids)) - before)
        api.close()
    return statistics.median(ours), statistics.median(baseline), statistics.median(cpu)


def main() -> None:
    redis_url = resolve_redis_url()
    sim_port = free_port()
    base_url = f"http://127.0.0.1:{sim_port}/v1"
    env = bench_env(redis_url, "bench.batch", OPENAI_BASE_URL=base_url, OPENAI_API_KEY="sim",
                    GENX_LLM_LIMITS=json.dumps(LIMITS))  # fmt: skip
    for name in [k for k in env if k.startswith("OTEL_")]:
        del env[name]
    with simulator(env, sim_port):
        off, plain_off, cpu_off = stretch(env, base_url)
        with collector() as endpoint:
            traced = {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
            on, plain_on, cpu_on = stretch(traced, base_url)
    os.environ.pop("OPENAI_BASE_URL", None)
    cost = (on / plain_on) / (off / plain_off) - 1
    print(f"  {CALLS} calls x 100 ms, cap 64, the default map, median of {ROUNDS}:")
    print(f"    tracing off   {off:6.2f} s   (plain asyncio meanwhile {plain_off:5.2f} s)"
          f"  x{off / plain_off:.3f} plain")  # fmt: skip
    print(f"    tracing on    {on:6.2f} s   (plain asyncio meanwhile {plain_on:5.2f} s)"
          f"  x{on / plain_on:.3f} plain   {_Collector.exports} exports,"
          f" {_Collector.received / 1e6:.1f} MB of spans")  # fmt: skip
    print(f"    CPU of the stack's processes per map: off {cpu_off:.2f} s, on {cpu_on:.2f} s"
          f" ({(cpu_on / cpu_off - 1) * 100:+.1f}%, {(cpu_on - cpu_off) / CALLS * 1e6:.0f} us"
          " per call)")  # fmt: skip
    print(f"    cost of tracing: {cost * 100:+.1f}% (goal <= 3%)")


if __name__ == "__main__":
    main()
