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
import wf_fixtures  # noqa: F401 - registers the test workflows the document types

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
    assert set(body["properties"]) == {"input", "start_at", "delay_seconds", "priority", "tags"}
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


BIG = "1" * 5000  # more digits than Python turns into an int: today a 500 on every body
LONG = "9" * 4000  # fewer: an int, far beyond any field's range
HUGE = "1e999"  # a float JSON allows and Python reads as infinity


def _bodies(schema: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """Bodies with a giant number in every place the route's body schema names, one at a time,
    and in place of the whole body."""
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    out = []
    # (A 4,000-digit integer is a valid body where a field has no bound: it would start runs.)
    for number in (BIG, HUGE):
        out += [number, f'{{"x": {number}}}', f"[{number}]"]
        for name, prop in (schema.get("properties") or {}).items():
            out.append(f'{{"{name}": {number}}}')
            if "$ref" in prop:
                prop = spec["components"]["schemas"][prop["$ref"].rsplit("/", 1)[1]]
            for inner in prop.get("properties") or {}:
                out.append(f'{{"{name}": {{"{inner}": {number}}}}}')
    return out


async def test_every_route_answers_a_giant_number_with_a_4xx(redis_url: str) -> None:
    """Every route of the document, with a 5,000-digit integer (and 1e999) in its body, in every
    field its schema names, and (a 4,000-digit one too) in its number query parameters: a 4xx
    with the error body, never a 500."""
    settings = Settings.from_env({"GENX_REDIS_URL": redis_url, "GENX_API_KEYS": f"{KEY}:acme"})
    app = create_app(settings, registry, redis_url)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
            spec = (await api.get("/openapi.json")).json()
            made = await api.post("/v1/workflows/review/runs", json={"input": {"n": 1}},
                                  headers=auth)  # fmt: skip
            run_id = made.json()["id"]
            schedule = await api.post("/v1/schedules", headers=auth,
                                      json={"workflow": "review", "cron": "0 9 * * *"})  # fmt: skip
            values = {"run_id": run_id, "schedule_id": schedule.json()["id"]}
            tried = 0
            for path, methods in spec["paths"].items():
                url = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)
                for method, op in methods.items():
                    body = op.get("requestBody", {}).get("content", {}).get("application/json")
                    bodies = _bodies(body["schema"], spec) if body else []
                    queries = [{p["name"]: number} for p in op.get("parameters", [])
                               if p["in"] == "query" and p.get("schema", {}).get("type")
                               in ("integer", "number") for number in (BIG, LONG, HUGE)]  # fmt: skip
                    if method == "delete" or path == "/v1/runs/{run_id}/cancel":
                        continue  # nothing to give a number to (and it would end the run)
                    for content in bodies if method != "get" else []:
                        resp = await api.request(method.upper(), url, content=content,
                                                 headers=auth)  # fmt: skip
                        tried += 1
                        assert 400 <= resp.status_code < 500, (method, path, content[:40],
                                                               resp.text)  # fmt: skip
                        assert resp.json()["error"]["code"], resp.text
                    for query in queries:
                        resp = await api.request(method.upper(), url, params=query, headers=auth)
                        tried += 1
                        assert 400 <= resp.status_code < 500, (method, path, query, resp.text)
            assert tried > 100
            await api.post(f"/v1/runs/{run_id}/cancel", headers=auth)
            await api.delete(f"/v1/schedules/{values['schedule_id']}", headers=auth)
