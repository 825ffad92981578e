"""Traces across the real processes: a gateway, a worker with its Ray run hosts, map actors and
tasks, exporting over OTLP/HTTP to a receiver the test runs. One run is one trace, from the
client's ``traceparent`` to the LLM calls, its restarted attempt included."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from helpers import wait_up
from otlp_receiver import Receiver, Span

from genx_ray.store import free_port

pytestmark = pytest.mark.timeout(240)
TESTS = os.path.dirname(os.path.dirname(__file__))
CLI = [sys.executable, "-m", "genx_ray.cli"]


@dataclass
class Stack:
    api: str
    receiver: Receiver


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[Stack]:
    receiver = Receiver()
    sim_port, api_port = free_port(), free_port()
    env = {
        **os.environ, "GENX_REDIS_URL": redis_url, "GENX_WORKFLOWS": "wf_observe",
        "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
        "OPENAI_BASE_URL": f"http://127.0.0.1:{sim_port}/v1", "OPENAI_API_KEY": "sim",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within a tenth of a second: the test waits less
    }  # fmt: skip
    env.pop("OTEL_SERVICE_NAME", None)
    procs = [
        subprocess.Popen([*CLI, "sim", "--port", str(sim_port), "--latency-ms", "20"], env=env),
        subprocess.Popen([*CLI, "gateway", "--port", str(api_port)], env=env),
        subprocess.Popen([*CLI, "worker", "--drain-timeout", "2"], env=env,
                         stderr=subprocess.DEVNULL),
    ]  # fmt: skip
    try:
        wait_up(f"http://127.0.0.1:{sim_port}/sim/stats", procs[0])
        wait_up(f"http://127.0.0.1:{api_port}/healthz", procs[1])
        yield Stack(f"http://127.0.0.1:{api_port}", receiver)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        receiver.close()


def _until_paused(api: str, run_id: str) -> None:
    """Follow the run's events until its pause step says it pauses."""
    with httpx.stream("GET", f"{api}/v1/runs/{run_id}/events", timeout=90) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:") and '"kind":"paused"' in line.replace(" ", ""):
                return
    raise AssertionError("the run ended without pausing")


def _one(spans: list[Span], name: str | None = None, **attrs: Any) -> Span:
    found = _all(spans, name, **attrs)
    assert len(found) == 1, (name, attrs, [(s.name, s.attributes) for s in found])
    return found[0]


def _all(spans: list[Span], name: str | None = None, **attrs: Any) -> list[Span]:
    return [
        s for s in spans
        if (name is None or s.name == name)
        and all(s.attributes.get(k.replace("__", ".")) == v for k, v in attrs.items())
    ]  # fmt: skip


def test_one_trace_from_the_request_to_the_llm_calls_across_processes_and_a_restart(
    stack: Stack, redis_url: str
) -> None:
    from genx_ray.store import keys, sync_redis

    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    resp = httpx.post(
        f"{stack.api}/v1/workflows/observed/runs", json={"input": {"n": 4, "wait": 3}},
        headers={"traceparent": f"00-{trace_id}-{client_span}-01"}, timeout=30,
    )  # fmt: skip
    assert resp.status_code == 202, resp.text
    run = resp.json()
    assert run["trace_id"] == trace_id  # the run continues the client's trace

    _until_paused(stack.api, run["id"])
    time.sleep(1)  # its finished spans are exported (OTEL_BSP_SCHEDULE_DELAY) before the kill
    host = sync_redis(redis_url).hget(keys.run(run["id"]), "host")  # "<hostname>:<pid>"
    os.kill(int(str(host).rsplit(":", 1)[1]), signal.SIGKILL)  # attempt 1 dies mid-step

    deadline = time.monotonic() + 120
    while (done := httpx.get(f"{stack.api}/v1/runs/{run['id']}").json())["status"] != "succeeded":
        assert done["status"] in ("queued", "running") and time.monotonic() < deadline, done
        time.sleep(0.2)
    assert done["attempt"] == 2 and done["output"] == {"answers": 4, "loud": "DONE"}
    assert done["trace_id"] == trace_id

    def complete(spans: list[Span]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return bool(_all(mine, "run observed", genx__attempt=2)) and bool(
            _all(mine, "task shout")
        ) and len(_all(mine, "step ask")) >= 3  # fmt: skip

    spans = [s for s in stack.receiver.wait_for(complete) if s.trace_id == trace_id]
    by_id = {s.span_id: s for s in spans}

    # Every process that worked on the run sent spans of this one trace.
    assert {"genx-gateway", "genx-run-host", "genx-map-actor", "genx-task"} <= {
        s.service for s in spans
    }
    mine = [s for s in stack.receiver.spans if s.attributes.get("genx.run.id") == run["id"]]
    assert {s.trace_id for s in mine} == {trace_id}

    # POST (continuing the client's span) -> the attempt that finished the run -> its steps.
    post = _one(spans, "POST /v1/workflows/{name}/runs")
    assert post.service == "genx-gateway" and post.parent_id == client_span
    assert post.attributes["genx.run.id"] == run["id"]
    assert post.attributes["http.response.status_code"] == 202
    attempt = _one(spans, "run observed", genx__attempt=2)
    assert attempt.parent_id == post.span_id and attempt.service == "genx-run-host"
    assert attempt.attributes["genx.run.status"] == "succeeded"
    assert attempt.attributes["genx.journal.steps"] >= 1  # what attempt 1 had finished

    # ... -> step -> LLM call, on the run host (the last ask runs in attempt 2 only).
    (bye,) = [s for s in _all(spans, "step ask") if s.parent_id == attempt.span_id
              and not s.attributes.get("genx.step.replayed")]  # fmt: skip
    (call,) = [s for s in spans if s.parent_id == bye.span_id]
    assert call.name == "chat gpt-4o-mini" and call.service == "genx-run-host"
    assert call.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert call.attributes["gen_ai.usage.input_tokens"] > 0
    assert call.attributes["gen_ai.usage.output_tokens"] > 0
    assert call.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert call.attributes["genx.step.id"] == bye.attributes["genx.step.id"]

    # ... -> map -> a chunk on a map actor -> its items' LLM calls there.
    mapped = _one(spans, "map ask_placed")
    assert mapped.parent_id == attempt.span_id
    assert mapped.attributes["genx.map.items"] == 4 and mapped.attributes["genx.map.failed"] == 0
    assert mapped.attributes["genx.map.concurrency"] == 4
    chunks = [s for s in spans if s.parent_id == mapped.span_id]
    assert chunks and {c.name for c in chunks} == {"map chunk ask_placed"}
    assert {c.service for c in chunks} == {"genx-map-actor"}
    items = [attrs for c in chunks for name, attrs in c.events if name == "item"]
    assert sorted(a["genx.step.id"] for a in items) == [
        f"{mapped.attributes['genx.step.id']}/{i}:ask_placed" for i in range(4)
    ]
    pool_calls = [s for s in spans if s.parent_id in {c.span_id for c in chunks}]
    assert len(pool_calls) == 4 and {s.service for s in pool_calls} == {"genx-map-actor"}
    assert all(s.name == "chat gpt-4o-mini" for s in pool_calls)

    # ... -> step -> the Ray task that ran a placed component's attempt.
    task = _one(spans, "task shout")
    assert by_id[task.parent_id].name == "step shout"
    assert by_id[task.parent_id].parent_id == attempt.span_id

    # The killed attempt was in the same trace: its first step (exported before the kill; its
    # own span never ended) hangs off another attempt span than attempt 2's, and attempt 2
    # replayed that step instead of calling the LLM again.
    first_asks = [s for s in _all(spans, "step ask") if s.parent_id != attempt.span_id]
    assert len(first_asks) == 1 and first_asks[0].attributes["genx.step.id"] == "/0:ask"
    assert first_asks[0].resource["process.pid"] != attempt.resource["process.pid"]
    replayed = _one(spans, "step ask", genx__step__replayed=True)
    assert replayed.parent_id == attempt.span_id
    assert not [s for s in spans if s.parent_id == replayed.span_id]  # no LLM call this time
