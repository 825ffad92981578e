"""The HTTP API in-process: every endpoint, the exact event streams, and every bad request."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from genx_ray.model import new_run_id

from .conftest import ApiFactory, sse


async def _events(api: httpx.AsyncClient, run_id: str, **kw: object) -> list[dict[str, object]]:
    resp = await api.get(f"/v1/runs/{run_id}/events", **kw)  # type: ignore[arg-type]
    assert resp.status_code == 200, resp.text
    return sse(resp.text)


async def test_workflows_and_openapi_show_schemas(api: httpx.AsyncClient) -> None:
    wfs = {w["name"]: w for w in (await api.get("/v1/workflows")).json()}
    assert wfs["echo"]["description"] == "Shout the text back."
    assert wfs["echo"]["input_schema"]["required"] == ["text"]
    assert wfs["echo"]["output_schema"] == {"type": "string"}
    spec = (await api.get("/openapi.json")).json()
    start = spec["paths"]["/v1/workflows/echo/runs"]["post"]  # a route of its own per workflow
    assert start["operationId"] == "start_echo"
    assert (await api.get("/healthz")).json()["status"] == "ok"


async def test_async_start_then_full_replay(api: httpx.AsyncClient) -> None:
    resp = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "hi"}})
    assert resp.status_code == 202
    run = resp.json()
    assert run["status"] == "queued" and run["input"] == {"text": "hi"} and run["priority"] == 3
    assert resp.headers["location"] == f"/v1/runs/{run['id']}"
    assert set(run) == {"id", "workflow", "status", "input", "output", "error", "attempt",
                        "created_at", "started_at", "finished_at", "cancel_requested", "usage",
                        "usage_by_model", "parent_id", "start_at", "schedule_id", "waiting",
                        "trace_id", "tags", "priority", "rerun_of", "rerun_from_step", "reruns",
                        "stream_token"}  # fmt: skip
    frames = await _events(api, run["id"])
    assert [f["event"] for f in frames] == [
        "run.queued", "run.started", "step.started", "step.completed", "run.succeeded",
    ]  # fmt: skip
    assert all(f["data"]["type"] == f["event"] and f["data"]["run_id"] == run["id"] for f in frames)
    assert frames[2]["data"]["step"] == {"id": "/0:shout", "name": "shout", "attempt": 1}
    assert frames[-1]["data"]["output"] == "HI"
    done = (await api.get(f"/v1/runs/{run['id']}")).json()
    assert done["status"] == "succeeded" and done["output"] == "HI" and done["finished_at"]


async def test_resume_after_an_id_gives_exactly_the_later_events(api: httpx.AsyncClient) -> None:
    run = (await api.post("/v1/workflows/ticker/runs?wait=20", json={"input": {"n": 10}})).json()
    assert run["status"] == "succeeded"
    full = await _events(api, run["id"])
    for cut in range(len(full)):
        last = full[cut]["id"]
        by_header = await _events(api, run["id"], headers={"Last-Event-ID": last})
        by_query = await _events(api, run["id"], params={"after": last})
        assert [f["id"] for f in by_header] == [f["id"] for f in full[cut + 1 :]]
        assert by_query == by_header
    lines = (
        await api.get(f"/v1/runs/{run['id']}/events", headers={"Accept": "application/x-ndjson"})
    ).text.splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f["id"] for f in full]


async def test_sync_wait(api: httpx.AsyncClient) -> None:
    resp = await api.post("/v1/workflows/echo/runs?wait=10", json={"input": {"text": "x"}})
    assert resp.status_code == 200 and resp.json()["output"] == "X"
    slow = await api.post("/v1/workflows/sleepy/runs?wait=0.3", json={"input": {"seconds": 30}})
    assert slow.status_code == 202 and slow.json()["status"] in ("queued", "running")
    await api.post(f"/v1/runs/{slow.json()['id']}/cancel")


async def test_start_and_stream(api: httpx.AsyncClient) -> None:
    resp = await api.post(
        "/v1/workflows/ticker/runs", json={"input": {"n": 3}},
        headers={"Accept": "text/event-stream"},
    )  # fmt: skip
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    frames = sse(resp.text)
    assert [f["event"] for f in frames].count("progress") == 3
    assert frames[-1]["event"] == "run.succeeded" and frames[-1]["data"]["output"] == 3


async def test_cancel(api: httpx.AsyncClient) -> None:
    run = (await api.post("/v1/workflows/sleepy/runs", json={"input": {}})).json()
    for _ in range(100):
        if (await api.get(f"/v1/runs/{run['id']}")).json()["status"] == "running":
            break
        await asyncio.sleep(0.02)
    resp = await api.post(f"/v1/runs/{run['id']}/cancel")
    assert resp.status_code in (200, 202)
    frames = await _events(api, run["id"])  # closes once the run is cancelled
    assert frames[-1]["event"] == "run.cancelled"
    assert (await api.get(f"/v1/runs/{run['id']}")).json()["status"] == "cancelled"
    assert (await api.post(f"/v1/runs/{run['id']}/cancel")).status_code == 200  # idempotent
    done = (await api.post("/v1/workflows/echo/runs?wait=10", json={"input": {"text": "a"}})).json()
    conflict = await api.post(f"/v1/runs/{done['id']}/cancel")
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "invalid_transition"


async def test_idempotency_key(api: httpx.AsyncClient) -> None:
    key = {"Idempotency-Key": f"k-{new_run_id()}"}
    first = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "a"}}, headers=key)
    again = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "a"}}, headers=key)
    assert first.status_code == 202 and again.status_code == 200
    assert (
        again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    )
    other = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "b"}}, headers=key)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    elsewhere = await api.post("/v1/workflows/ticker/runs", json={"input": {"n": 1}}, headers=key)
    assert elsewhere.status_code == 202 and elsewhere.json()["id"] != first.json()["id"]
    concurrent = {"Idempotency-Key": f"k-{new_run_id()}"}
    many = await asyncio.gather(*(
        api.post("/v1/workflows/echo/runs", json={"input": {"text": "c"}}, headers=concurrent)
        for _ in range(10)
    ))  # fmt: skip
    assert len({r.json()["id"] for r in many}) == 1


async def test_list_filters_and_cursor(api: httpx.AsyncClient) -> None:
    ids = []
    for i in range(5):
        ids.append((await api.post("/v1/workflows/echo/runs?wait=10",
                                   json={"input": {"text": str(i)}})).json()["id"])  # fmt: skip
    page = (await api.get("/v1/runs", params={"workflow": "echo", "limit": 3})).json()
    assert [r["id"] for r in page["runs"]] == ids[::-1][:3]
    nxt = (await api.get("/v1/runs", params={"workflow": "echo", "limit": 2,
                                             "cursor": page["next_cursor"]})).json()  # fmt: skip
    assert [r["id"] for r in nxt["runs"]] == ids[::-1][3:5]
    ok = (await api.get("/v1/runs", params={"status": "succeeded", "limit": 500})).json()
    assert all(r["status"] == "succeeded" for r in ok["runs"]) and set(ids) <= {
        r["id"] for r in ok["runs"]
    }


async def test_tenants_are_isolated(make_api: ApiFactory) -> None:
    async with make_api(GENX_API_KEYS="ka-0123456789abcdef:acme,kb-0123456789abcdef:globex") as api:
        a, b = (
            {"Authorization": "Bearer ka-0123456789abcdef"},
            {"Authorization": "Bearer kb-0123456789abcdef"},
        )
        assert (await api.get("/v1/workflows")).status_code == 401
        bad = await api.get("/v1/workflows", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorized"
        run = (await api.post("/v1/workflows/echo/runs?wait=10", json={"input": {"text": "s"}},
                              headers=a)).json()  # fmt: skip
        assert (await api.get(f"/v1/runs/{run['id']}", headers=a)).status_code == 200
        for path in (f"/v1/runs/{run['id']}", f"/v1/runs/{run['id']}/events"):
            resp = await api.get(path, headers=b)
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "run_not_found"
        assert (await api.post(f"/v1/runs/{run['id']}/cancel", headers=b)).status_code == 404
        assert run["id"] not in {
            r["id"] for r in (await api.get("/v1/runs", headers=b)).json()["runs"]
        }
        assert run["id"] in {r["id"] for r in (await api.get("/v1/runs", headers=a)).json()["runs"]}


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("post", "/v1/workflows/nope/runs", {"json": {"input": {}}}, 404, "workflow_not_found"),
        ("post", "/v1/workflows/echo/runs", {"content": b"{not json"}, 400, "invalid_request"),
        ("post", "/v1/workflows/echo/runs", {"json": [1, 2]}, 400, "invalid_request"),
        ("post", "/v1/workflows/echo/runs", {"json": {"input": {}, "x": 1}}, 400, "invalid_request"),
        ("post", "/v1/workflows/echo/runs", {"json": {"input": {"text": 5}}}, 422, "invalid_input"),
        ("post", "/v1/workflows/echo/runs", {"json": {"input": {"txt": "a"}}}, 422, "invalid_input"),
        ("post", "/v1/workflows/echo/runs", {"json": {"input": {"text": "a" * 2_000_000}}}, 413,
         "payload_too_large"),
        ("post", "/v1/workflows/echo/runs?wait=-1", {"json": {"input": {"text": "a"}}}, 400,
         "invalid_request"),
        ("get", "/v1/runs/run_nope", {}, 404, "run_not_found"),
        ("get", "/v1/runs/run_nope/events", {}, 404, "run_not_found"),
        ("post", "/v1/runs/run_nope/cancel", {}, 404, "run_not_found"),
        ("get", "/v1/runs?status=exploded", {}, 400, "invalid_request"),
        ("get", "/v1/runs?limit=0", {}, 400, "invalid_request"),
    ],
)  # fmt: skip
async def test_bad_requests_get_clear_errors_and_create_nothing(
    api: httpx.AsyncClient,
    method: str,
    path: str,
    kwargs: dict[str, object],
    status: int,
    code: str,
) -> None:
    before = len((await api.get("/v1/runs", params={"limit": 500})).json()["runs"])
    resp = await getattr(api, method)(path, **kwargs)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code and resp.json()["error"]["message"]
    assert len((await api.get("/v1/runs", params={"limit": 500})).json()["runs"]) == before


async def test_malformed_last_event_id_is_400(api: httpx.AsyncClient) -> None:
    run = (await api.post("/v1/workflows/echo/runs?wait=10", json={"input": {"text": "a"}})).json()
    for headers, params in (({"Last-Event-ID": "garbage"}, {}), ({}, {"after": "1-2-3"})):
        resp = await api.get(f"/v1/runs/{run['id']}/events", headers=headers, params=params)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request"


def test_the_gateway_never_imports_ray() -> None:
    code = (
        "import sys; from gateway.app import create_app; from genx_ray.model._settings import Settings; "
        "create_app(Settings.from_env()); "
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
