"""The OpenAPI document is the API: typed per workflow, every status with the real error body,
fuzzed with every schemathesis check against real processes (keys on), and a client generated
from it starts a run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from genx_ray.flow import registry
from genx_ray.model import Settings
from genx_ray.store import free_port

HERE = os.path.dirname(__file__)
TESTS = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)
KEY = "fuzz-key-0123456789"


async def test_the_document_types_each_workflow_and_every_answer(redis_url: str) -> None:
    # No worker here: the processes below share this Redis, and a worker of this process
    # (blocked while a sync test runs) would take their runs.
    settings = Settings.from_env({"GENX_REDIS_URL": redis_url, "GENX_API_KEYS": f"{KEY}:acme"})
    app = create_app(settings, registry, redis_url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
            spec = (await api.get("/openapi.json")).json()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    assert "/v1/workflows/{name}/runs" not in paths  # a typed route per workflow instead
    start = paths["/v1/workflows/review/runs"]["post"]
    body = start["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"input", "start_at", "delay_seconds"}
    assert body["properties"]["input"]["properties"]["n"]["type"] == "integer"
    created = start["responses"]["202"]["content"]["application/json"]["schema"]["$ref"]
    assert created == "#/components/schemas/ReviewRun"
    for code in ("400", "401", "404", "409", "413", "422", "429", "503"):
        error = start["responses"][code]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/Error"}, code
    assert "Retry-After" in start["responses"]["429"]["headers"]
    assert start["security"] == [{"bearer": []}]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    events = paths["/v1/runs/{run_id}/events"]["get"]["responses"]["200"]["content"]
    assert set(events) == {"text/event-stream", "application/x-ndjson"}
    frame = events["text/event-stream"]["schema"]["properties"]
    assert (
        "run.succeeded" in frame["event"]["enum"] and "events.truncated" in frame["event"]["enum"]
    )
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert paths["/healthz"]["get"]["security"] == []

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "$ref"] + [
                r for v in node.values() for r in refs(v)
            ]
        return [r for v in node for r in refs(v)] if isinstance(node, list) else []

    dangling = {r for r in refs(spec) if r.removeprefix("#/components/schemas/") not in schemas}
    assert dangling == set()


@pytest.fixture(scope="module")
def fuzz_stack(redis_url: str) -> Iterator[str]:
    """A gateway (API keys on) and a worker serving quick typed workflows, as processes."""
    env = {
        **os.environ, "GENX_REDIS_URL": redis_url, "GENX_WORKFLOWS": "wf_fuzz",
        "GENX_API_KEYS": f"{KEY}:acme",
        "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
    }  # fmt: skip
    port = free_port()
    cli = [sys.executable, "-m", "genx_ray.cli"]
    procs = [
        subprocess.Popen([*cli, "worker", "--hosts", "inline", "--drain-timeout", "1"], env=env),
        subprocess.Popen([*cli, "gateway", "--port", str(port)], env=env),
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert all(p.poll() is None for p in procs), "the stack exited"
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway did not come up"
            time.sleep(0.1)
        yield url
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_schemathesis_with_every_check_finds_nothing(fuzz_stack: str) -> None:
    proc = subprocess.run(
        [os.path.join(BIN, "st"), "--config-file", os.path.join(HERE, "schemathesis.toml"),
         "run", f"{fuzz_stack}/openapi.json", "--checks", "all",
         "-H", f"Authorization: Bearer {KEY}", "--max-examples", "25", "--workers", "1",
         "--request-timeout", "20", "--seed", "20261127", "--no-color"],
        capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    report = proc.stdout
    failures = report.find("FAILURES")
    tail = report[failures : failures + 8000] if failures >= 0 else report[-4000:]
    assert proc.returncode == 0, tail
    counts = re.search(r"(\d+) generated, (\d+) passed", tail)
    assert counts and counts.group(1) == counts.group(2) and int(counts.group(1)) > 500, tail


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_client_generated_from_the_document_starts_a_run(fuzz_stack: str, tmp_path: Any) -> None:
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(httpx.get(f"{fuzz_stack}/openapi.json").json()))
    made = subprocess.run(
        [os.path.join(BIN, "openapi-python-client"), "generate", "--path", str(spec),
         "--meta", "none", "--output-path", str(tmp_path / "genx_client")],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    sys.path.insert(0, str(tmp_path))
    try:
        from genx_client import AuthenticatedClient  # type: ignore[import-not-found]
        from genx_client.api.runs import get_run  # type: ignore[import-not-found]
        from genx_client.api.workflows import start_quote  # type: ignore[import-not-found]
        from genx_client.models import StartQuoteBody  # type: ignore[import-not-found]

        client = AuthenticatedClient(base_url=fuzz_stack, token=KEY)
        order = {"customer": "Ada", "items": [{"sku": "bolt", "qty": 3}, {"sku": "nut", "qty": 4}],
                 "priority": "high"}  # fmt: skip
        body = StartQuoteBody.from_dict({"input": order})  # one model parameter: the input
        run = start_quote.sync(client=client, body=body, wait=20)
        assert run.status == "succeeded", run
        assert run.output.to_dict() == {"customer": "Ada", "units": 7, "rush": True}
        again = get_run.sync(run_id=run.id, client=client)
        assert again.to_dict()["output"] == {"customer": "Ada", "units": 7, "rush": True}
        refused = start_quote.sync_detailed(client=AuthenticatedClient(base_url=fuzz_stack,
                                                                       token="wrong"), body=body)  # fmt: skip
        assert refused.status_code == 401
        assert json.loads(refused.content)["error"]["code"] == "unauthorized"
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "genx_client" or m.startswith("genx_client.")]:
            del sys.modules[name]
