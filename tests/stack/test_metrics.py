"""``GET /metrics`` of a real gateway and a real worker (``--metrics-port``), scraped and parsed
with ``prometheus_client.parser`` before and after runs: the counters move by what the runs did,
whichever process did it (the gateway, a run host, a map actor)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from helpers import wait_up
from prometheus_client.parser import text_string_to_metric_families

from genx_ray.store import free_port

pytestmark = pytest.mark.timeout(240)
TESTS = os.path.dirname(os.path.dirname(__file__))
CLI = [sys.executable, "-m", "genx_ray.cli"]
WF = "observed"  # tests/wf_observe.py
MODEL = "gpt-4o-mini"

Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Scrape:
    resp = httpx.get(f"{url}/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def value(scraped: Scrape, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


@dataclass
class Stack:
    api: str
    sim: str
    env: dict[str, str]
    worker_url: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self) -> None:
        port = free_port()
        self.procs.append(subprocess.Popen(
            [*CLI, "worker", "--drain-timeout", "2", "--metrics-port", str(port)],
            env=self.env, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        self.worker_url = f"http://127.0.0.1:{port}"
        wait_up(f"{self.worker_url}/metrics", self.procs[-1])


@pytest.fixture(scope="module")
def stack(single_redis_url: str) -> Iterator[Stack]:
    """A gateway and the LLM simulator; the worker is started by the first test. On a database
    of their own: runs other tests left behind must not move the queue's gauges."""
    sim_port, api_port = free_port(), free_port()
    env = {
        **os.environ, "GENX_REDIS_URL": single_redis_url.rsplit("/", 1)[0] + "/7",
        "GENX_WORKFLOWS": "wf_observe",
        "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
        "OPENAI_BASE_URL": f"http://127.0.0.1:{sim_port}/v1", "OPENAI_API_KEY": "sim",
    }  # fmt: skip
    for name in [n for n in env if n.startswith("OTEL_")]:
        del env[name]
    stack = Stack(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{sim_port}", env)
    stack.procs += [
        subprocess.Popen([*CLI, "sim", "--port", str(sim_port), "--latency-ms", "20"], env=env),
        subprocess.Popen([*CLI, "gateway", "--port", str(api_port)], env=env),
    ]
    try:
        wait_up(f"{stack.sim}/sim/stats", stack.procs[0])
        wait_up(f"{stack.api}/healthz", stack.procs[1])
        yield stack
    finally:
        for proc in stack.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in stack.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _finished(api: str, run_id: str, timeout: float = 90) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while (run := httpx.get(f"{api}/v1/runs/{run_id}").json())["status"] not in (
        "succeeded", "failed", "cancelled",
    ):  # fmt: skip
        assert time.monotonic() < deadline, run
        time.sleep(0.1)
    return run  # type: ignore[no-any-return]


def _eventually(read: Callable[[], Scrape], done: Callable[[Scrape], bool]) -> Scrape:
    """Scrape until ``done`` (run hosts report at their next health ping, within a second)."""
    deadline = time.monotonic() + 15
    while not done(scraped := read()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return scraped


def test_the_queue_gauges_show_runs_no_worker_took_yet(stack: Stack) -> None:
    before = scrape(stack.api)
    assert value(before, "genx_queue_depth") == 0 and value(before, "genx_sse_clients") == 0
    runs = [httpx.post(f"{stack.api}/v1/workflows/{WF}/runs",
                       json={"input": {"n": 1}, "priority": p}).json()
            for p in (3, 1)]  # fmt: skip
    time.sleep(0.3)
    waiting = scrape(stack.api)
    # Nobody takes them. (A Redis that never ran the create script queues the first run twice:
    # see RunStore.create. The second entry is refused when claimed.)
    assert value(waiting, "genx_queue_depth") in (2, 3)
    assert 0.3 <= value(waiting, "genx_queue_oldest_age_seconds") < 30
    # ...and by tenant and priority
    assert value(waiting, "genx_queue_tenant_depth", tenant="default", priority="3") in (1, 2)
    assert value(waiting, "genx_queue_tenant_depth", tenant="default", priority="1") == 1
    assert 0.3 <= value(waiting, "genx_queue_tenant_oldest_age_seconds", tenant="default",
                        priority="1") < 30  # fmt: skip
    assert value(waiting, "genx_runs_created_total", workflow=WF) == value(
        before, "genx_runs_created_total", workflow=WF
    ) + 2  # fmt: skip

    stack.start_worker()
    for run in runs:
        assert _finished(stack.api, run["id"])["status"] == "succeeded"
    drained = _eventually(lambda: scrape(stack.worker_url),
                          lambda s: value(s, "genx_runs_finished_total", workflow=WF,
                                          status="succeeded") == 2)  # fmt: skip
    assert value(drained, "genx_queue_depth") == 0
    assert value(drained, "genx_queue_oldest_age_seconds") == 0
    assert value(drained, "genx_runs_running") == 0


def test_counters_move_by_what_a_run_did(stack: Stack) -> None:
    if not stack.worker_url:
        stack.start_worker()
    api_before, worker_before = scrape(stack.api), scrape(stack.worker_url)
    # The next two LLM requests get a 429: two retries, two 429s.
    httpx.post(f"{stack.sim}/sim/config", json={"latency_ms": 20, "throttle_next": 2,
                                                "retry_after": 0.05})  # fmt: skip
    run = httpx.post(f"{stack.api}/v1/workflows/{WF}/runs",
                     json={"input": {"n": 4, "wait": 1.5}}).json()  # fmt: skip

    # While the run runs, an event stream follows it: the gateway counts it, and the delay of
    # every event appended meanwhile.
    frames: list[str] = []
    follower = threading.Thread(target=lambda: frames.extend(
        line for line in httpx.get(f"{stack.api}/v1/runs/{run['id']}/events", timeout=60)
        .text.splitlines() if line.startswith("event:")
    ))  # fmt: skip
    follower.start()
    streaming = _eventually(lambda: scrape(stack.api), lambda s: value(s, "genx_sse_clients") == 1)
    running = scrape(stack.worker_url)
    assert value(running, "genx_runs_running") == 1
    follower.join(60)
    done = _finished(stack.api, run["id"])
    assert done["status"] == "succeeded" and done["attempt"] == 1
    usage = done["usage"]
    assert isinstance(usage, dict) and usage["calls"] == 6 and usage["retries"] == 2

    def moved(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    api_after = scrape(stack.api)
    assert moved(api_after, api_before, "genx_runs_created_total", workflow=WF) == 1
    assert value(streaming, "genx_sse_clients") == 1 and value(api_after, "genx_sse_clients") == 0
    delivered = moved(api_after, api_before, "genx_sse_delivery_delay_seconds_count", format="sse")
    assert 5 <= delivered <= len(frames)  # run.started... all after it connected, but the first
    delay = moved(api_after, api_before, "genx_sse_delivery_delay_seconds_sum", format="sse")
    assert 0 <= delay / delivered < 1

    after = _eventually(
        lambda: scrape(stack.worker_url),
        lambda s: moved(s, worker_before, "genx_runs_finished_total", workflow=WF,
                        status="succeeded") == 1,
    )  # fmt: skip
    assert moved(after, worker_before, "genx_runs_started_total", workflow=WF) == 1
    # Six LLM calls: two on the run host, four on the map actors (counted where the run is).
    assert moved(after, worker_before, "genx_llm_calls_total", model=MODEL, outcome="ok") == 6
    assert moved(after, worker_before, "genx_llm_calls_total", model=MODEL, outcome="error") == 0
    assert moved(after, worker_before, "genx_llm_retries_total", model=MODEL) == 2
    assert moved(after, worker_before, "genx_llm_rate_limited_total", model=MODEL) == 2
    for kind, counted in (("input", "prompt_tokens"), ("output", "completion_tokens")):
        tokens = moved(after, worker_before, "genx_llm_tokens_total", model=MODEL, type=kind)
        assert tokens == usage[counted] > 0  # what the run's own usage says
    waits = moved(after, worker_before, "genx_llm_limiter_wait_seconds_count", model=MODEL)
    assert waits == 8  # every request waited for its budget once: 6 calls + 2 retries
    steps = {c: moved(after, worker_before, "genx_step_duration_seconds_count", component=c)
             for c in ("ask", "pause", "ask_placed", "ask_placed.map", "shout")}  # fmt: skip
    assert steps == {"ask": 2, "pause": 1, "ask_placed": 4, "ask_placed.map": 1, "shout": 1}
    paused = moved(after, worker_before, "genx_step_duration_seconds_sum", component="pause")
    assert 1.45 <= paused < 5  # a 1.5 s sleep (the loop's clock may run a hair short)
    assert moved(after, worker_before, "genx_step_duration_seconds_bucket", component="pause",
                 le="1.0") == 0  # fmt: skip
    assert moved(after, worker_before, "genx_step_duration_seconds_bucket", component="pause",
                 le="2.5") == 1  # fmt: skip
    assert value(after, "genx_runs_running") == 0
