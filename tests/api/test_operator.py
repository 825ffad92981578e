"""The operator's loop over HTTP: a run's steps, reruns (from a step, from the start, with a new
input), tags and the filters that find runs by them, bulk cancel and rerun (tenant-scoped, dry
runs, idempotent), counts by status, schedules paused, and the cluster's state."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from wf_fixtures import ran

from .conftest import ApiFactory, sse

KEY_A, KEY_B, KEY_Q = "ops-key-a-0123456789", "ops-key-b-0123456789", "ops-key-q-0123456789"
KEYS = f"{KEY_A}:ops-a,{KEY_B}:ops-b"  # tenants of this module only (a session shares one Redis)
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture(scope="module")
async def api(make_api: ApiFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with make_api(GENX_API_KEYS=KEYS) as client:
        client.headers.update(A)
        yield client


@pytest.fixture
def files() -> dict[str, str]:
    """A step log and a flag file (set: the third step of ``ingest`` fails)."""
    where = tempfile.mkdtemp(prefix="genx-ingest-")
    flag = os.path.join(where, "flag")
    open(flag, "w").close()
    return {"log": os.path.join(where, "log"), "flag": flag}


async def _ended(api: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    """The run, once it ended (its event stream closes after the terminal event)."""
    resp = await api.get(f"/v1/runs/{run_id}/events")
    assert resp.status_code == 200 and sse(resp.text)[-1]["event"].startswith("run.")
    return (await api.get(f"/v1/runs/{run_id}")).json()


async def _failed_ingest(
    api: httpx.AsyncClient, files: dict[str, str], **body: Any
) -> dict[str, Any]:
    resp = await api.post(
        "/v1/workflows/ingest/runs?wait=20",
        json={"input": {"url": "http://x", **files}, **body},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "failed"
    return dict(resp.json())


async def test_a_rerun_from_the_failed_step_reuses_the_steps_before_it(
    api: httpx.AsyncClient, files: dict[str, str]
) -> None:
    run = await _failed_ingest(api, files, tags={"customer": "acme"})
    steps = (await api.get(f"/v1/runs/{run['id']}/steps")).json()["steps"]
    assert [(s["id"], s["component"], s["status"], s["attempts"]) for s in steps] == [
        ("/0:fetch_page", "fetch_page", "succeeded", 1),
        ("/1:parse_page", "parse_page", "succeeded", 1),
        ("/2:enrich_page", "enrich_page", "failed", 1),
    ]  # fmt: skip
    assert set(steps[0]) == {"id", "component", "kind", "parent", "status", "attempts",
                             "started_at", "finished_at", "cached", "reused", "error"}  # fmt: skip
    assert steps[2]["error"]["message"] == "the enrichment provider is down"
    assert steps[0]["started_at"] <= steps[0]["finished_at"] <= steps[2]["started_at"]
    before = (await api.get(f"/v1/runs/{run['id']}")).json()

    os.remove(files["flag"])
    resp = await api.post(f"/v1/runs/{run['id']}/rerun", json={"from_step": "/2:enrich_page"})
    assert resp.status_code == 202, resp.text
    rerun = resp.json()
    assert rerun["rerun_of"] == run["id"] and rerun["rerun_from_step"] == "/2:enrich_page"
    assert rerun["tags"] == {"customer": "acme"} and rerun["stream_token"]
    assert resp.headers["location"] == f"/v1/runs/{rerun['id']}"
    done = await _ended(api, rerun["id"])
    assert done["status"] == "succeeded"
    assert done["output"] == "stored: page of http://x, enriched"
    assert ran(files["log"]) == {"fetch_page": 1, "parse_page": 1, "enrich_page": 2,
                                 "store_page": 1}  # fmt: skip
    frames = sse((await api.get(f"/v1/runs/{rerun['id']}/events")).text)
    completed = [f["data"] for f in frames if f["event"] == "step.completed"]
    assert [(c["step"]["id"], c.get("reused", False)) for c in completed] == [
        ("/0:fetch_page", True), ("/1:parse_page", True),
        ("/2:enrich_page", False), ("/3:store_page", False),
    ]  # fmt: skip
    steps = (await api.get(f"/v1/runs/{rerun['id']}/steps")).json()["steps"]
    assert [(s["reused"], s["attempts"]) for s in steps] == [(True, 0), (True, 0), (False, 1),
                                                             (False, 1)]  # fmt: skip
    after = (await api.get(f"/v1/runs/{run['id']}")).json()
    assert after.pop("reruns") == [rerun["id"]]
    before.pop("reruns")
    assert after == before  # the original is untouched


async def test_rerun_from_the_start_with_a_new_input(
    api: httpx.AsyncClient, files: dict[str, str]
) -> None:
    run = await _failed_ingest(api, files)
    os.remove(files["flag"])
    new = {"url": "http://y", **files}
    resp = await api.post(f"/v1/runs/{run['id']}/rerun", json={"input": new, "from_step": None})
    assert resp.status_code == 202, resp.text
    done = await _ended(api, resp.json()["id"])
    assert done["output"] == "stored: page of http://y, enriched"
    assert done["input"] == {**new, "delay": 0.0}  # checked and encoded by the workflow
    assert done["rerun_from_step"] is None
    assert ran(files["log"]) == {"fetch_page": 2, "parse_page": 2, "enrich_page": 2,
                                 "store_page": 1}  # fmt: skip


async def test_a_rerun_that_cannot_be_is_refused_and_creates_nothing(
    api: httpx.AsyncClient, files: dict[str, str]
) -> None:
    run = await _failed_ingest(api, files)
    path = f"/v1/runs/{run['id']}/rerun"
    cases = [
        ({"from_step": "/9:nope"}, 422, "invalid_input"),
        ({"from_step": 3}, 422, "invalid_input"),
        ({"input": {"url": 5}}, 422, "invalid_input"),
        ({"step": "/0:fetch_page"}, 400, "invalid_request"),
    ]
    for body, status, code in cases:
        resp = await api.post(path, json=body)
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), body
    sleepy = (await api.post("/v1/workflows/sleepy/runs", json={"input": {}})).json()
    resp = await api.post(f"/v1/runs/{sleepy['id']}/rerun", json={})
    assert (resp.status_code, resp.json()["error"]["code"]) == (409, "run_not_ended")
    await api.post(f"/v1/runs/{sleepy['id']}/cancel")
    resp = await api.post(path, json={}, headers=B)  # another tenant's run
    assert resp.status_code == 404
    assert (await api.get(f"/v1/runs/{run['id']}")).json()["reruns"] == []


async def test_a_rerun_under_an_idempotency_key_is_made_once(
    api: httpx.AsyncClient, files: dict[str, str]
) -> None:
    run = await _failed_ingest(api, files)
    path, key = f"/v1/runs/{run['id']}/rerun", {"Idempotency-Key": "rerun-1"}
    first = await api.post(path, json={"from_step": "/2:enrich_page"}, headers=key)
    again = await api.post(path, json={"from_step": "/2:enrich_page"}, headers=key)
    assert first.status_code == 202 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = await api.post(path, json={"from_step": None}, headers=key)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    assert (await api.get(f"/v1/runs/{run['id']}")).json()["reruns"] == [first.json()["id"]]


async def test_tags_are_checked_shown_and_searched(api: httpx.AsyncClient) -> None:
    bad = [
        {str(i): "x" for i in range(17)},
        {"k" * 65: "x"},
        {"k": "v" * 257},
        {"a:b": "x"},
        {"k": 5},
        ["customer", "acme"],
    ]
    for tags in bad:
        resp = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "x"},
                                                               "tags": tags})  # fmt: skip
        assert resp.status_code == 422, tags
        assert resp.json()["error"]["code"] == "invalid_input"
    ok = {str(i): "x" * 256 for i in range(16)} | {"k" * 64: ""}
    del ok["0"]
    assert (
        await api.post("/v1/workflows/echo/runs", json={"input": {"text": "x"}, "tags": ok})
    ).status_code == 202
    made: dict[str, list[str]] = {}
    for customer, batch in [("t-acme", "b1"), ("t-acme", "b2"), ("t-zeta", "b1"), ("t-acme", "b1")]:
        run = (
            await api.post(
                "/v1/workflows/echo/runs?wait=10",
                json={"input": {"text": "x"}, "tags": {"customer": customer, "batch": batch}},
            )
        ).json()
        assert run["tags"] == {"customer": customer, "batch": batch}
        made.setdefault(f"{customer}/{batch}", []).append(run["id"])

    async def ids(**params: Any) -> list[str]:
        resp = await api.get("/v1/runs", params=params)
        assert resp.status_code == 200, resp.text
        return [r["id"] for r in resp.json()["runs"]]

    acme_b1 = made["t-acme/b1"]
    assert await ids(tag=["customer:t-acme", "batch:b1"]) == sorted(acme_b1)[::-1]  # newest 1st
    assert await ids(tag="customer:t-acme") == sorted(acme_b1 + made["t-acme/b2"])[::-1]
    assert await ids(tag="customer:t-acme", status="failed") == []
    assert await ids(tag="customer:t-acme", workflow="ingest") == []
    assert len(await ids(tag="customer:t-acme", status="succeeded")) == 3
    # Time ranges: runs created at or after, and before.
    first = (await api.get(f"/v1/runs/{acme_b1[0]}")).json()["created_at"]
    last = (await api.get(f"/v1/runs/{acme_b1[1]}")).json()["created_at"]
    assert await ids(tag="batch:b1", created_after=first, created_before=last) == sorted(
        [acme_b1[0], made["t-zeta/b1"][0]], reverse=True)  # fmt: skip
    assert await ids(tag="batch:b1", created_after=last) == [acme_b1[1]]
    # Another tenant sees none of them.
    assert (await api.get("/v1/runs", params={"tag": "customer:t-acme"}, headers=B)).json()[
        "runs"] == []  # fmt: skip
    for params in ({"tag": "nocolon"}, {"created_after": "yesterday"},
                   {"created_before": "2026-01-01T00:00:00"}):  # fmt: skip
        resp = await api.get("/v1/runs", params=params)
        assert (resp.status_code, resp.json()["error"]["code"]) == (400, "invalid_request"), params
    counts = (await api.get("/v1/runs/counts", params={"tag": "customer:t-acme"})).json()
    assert counts["counts"]["succeeded"] == 3 and counts["complete"] is True
    assert sum(counts["counts"].values()) == 3


async def test_child_runs_inherit_their_parents_tags(api: httpx.AsyncClient) -> None:
    parent = (
        await api.post(
            "/v1/workflows/family/runs?wait=30",
            json={"input": {"children": 2, "n": 1, "delay": 0}, "tags": {"team": "kids"}},
        )
    ).json()
    assert parent["status"] == "succeeded"
    runs = (await api.get("/v1/runs", params={"tag": "team:kids"})).json()["runs"]
    assert len(runs) == 3 and all(r["tags"] == {"team": "kids"} for r in runs)
    assert {r["parent_id"] for r in runs} == {None, parent["id"]}


async def test_priority_is_checked_shown_and_inherited_by_child_runs(
    api: httpx.AsyncClient,
) -> None:
    for bad in (0, 6, "1", 2.5, True, [1]):
        resp = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "x"},
                                                               "priority": bad})  # fmt: skip
        assert resp.status_code == 422, bad
        assert resp.json()["error"]["code"] == "invalid_input"
        assert "priority" in resp.text
    parent = (
        await api.post(
            "/v1/workflows/family/runs?wait=30",
            json={"input": {"children": 2, "n": 1, "delay": 0}, "tags": {"team": "urgent"},
                  "priority": 1},
        )
    ).json()  # fmt: skip
    assert parent["status"] == "succeeded" and parent["priority"] == 1
    runs = (await api.get("/v1/runs", params={"tag": "team:urgent"})).json()["runs"]
    assert len(runs) == 3 and all(r["priority"] == 1 for r in runs)
    rerun = await api.post(f"/v1/runs/{parent['id']}/rerun", json={})
    assert rerun.status_code == 202, rerun.text
    assert rerun.json()["priority"] == 1  # a rerun waits as its original did
    # Told otherwise (phases.with_priority(2)), the children wait at that priority instead.
    told = (
        await api.post(
            "/v1/workflows/family/runs?wait=30",
            json={"input": {"children": 2, "n": 1, "delay": 0, "child_priority": 2},
                  "tags": {"team": "told"}, "priority": 4},
        )
    ).json()  # fmt: skip
    assert told["status"] == "succeeded" and told["priority"] == 4
    runs = (await api.get("/v1/runs", params={"tag": "team:told"})).json()["runs"]
    assert sorted(r["priority"] for r in runs) == [2, 2, 4]


async def test_bulk_cancel_by_tag_cancels_exactly_the_tagged_runs_of_the_tenant(
    api: httpx.AsyncClient,
) -> None:
    async def start(tags: dict[str, str], headers: dict[str, str] = A) -> str:
        resp = await api.post("/v1/workflows/sleepy/runs", headers=headers,
                              json={"input": {"seconds": 60}, "tags": tags})  # fmt: skip
        assert resp.status_code == 202
        return str(resp.json()["id"])

    tagged = [await start({"batch": "bulk-1"}) for _ in range(3)]
    untagged = await start({"batch": "bulk-2"})
    theirs = await start({"batch": "bulk-1"}, headers=B)
    body = {"filter": {"tag": "batch:bulk-1"}, "dry_run": True}
    dry = (await api.post("/v1/runs/bulk/cancel", json=body)).json()
    assert (dry["matched"], dry["done"], dry["dry_run"]) == (3, 0, True)
    assert sorted(r["id"] for r in dry["runs"]) == sorted(tagged)
    for run_id in [*tagged, untagged]:  # a dry run changed nothing
        assert (await api.get(f"/v1/runs/{run_id}")).json()["cancel_requested"] is False
    done = (await api.post("/v1/runs/bulk/cancel", json={**body, "dry_run": False})).json()
    assert (done["matched"], done["done"]) == (3, 3)
    for run_id in tagged:
        assert (await _ended(api, run_id))["status"] == "cancelled"
    assert (await api.get(f"/v1/runs/{untagged}")).json()["status"] in ("queued", "running")
    assert (await api.get(f"/v1/runs/{theirs}", headers=B)).json()["status"] in (
        "queued", "running")  # fmt: skip
    named = (await api.post("/v1/runs/bulk/cancel", json={"filter": {"ids": [theirs]}})).json()
    assert named["matched"] == 0  # another tenant's run, even named by its id
    again = (await api.post("/v1/runs/bulk/cancel", json={"filter": {"tag": "batch:bulk-1",
                                                          "status": "running"}})).json()  # fmt: skip
    assert again["matched"] == 0
    for run_id, headers in ((untagged, A), (theirs, B)):
        await api.post(f"/v1/runs/{run_id}/cancel", headers=headers)


async def test_bulk_rerun_of_failed_runs_from_their_failed_step_is_idempotent(
    api: httpx.AsyncClient, files: dict[str, str]
) -> None:
    failed = [(await _failed_ingest(api, files, tags={"batch": "bulk-rr"}))["id"]
              for _ in range(3)]  # fmt: skip
    assert ran(files["log"])["enrich_page"] == 3
    os.remove(files["flag"])
    body = {"filter": {"tag": "batch:bulk-rr", "status": "failed"}, "from": "failed_step"}
    dry = (await api.post("/v1/runs/bulk/rerun", json={**body, "dry_run": True})).json()
    assert "matched" in dry, dry
    assert dry["matched"] == 3 and dry["done"] == 0
    assert {r["from_step"] for r in dry["runs"]} == {"/2:enrich_page"}
    key = {"Idempotency-Key": "bulk-rr-1"}
    resp = await api.post("/v1/runs/bulk/rerun", json=body, headers=key)
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert (result["matched"], result["done"]) == (3, 3)
    assert sorted(r["id"] for r in result["runs"]) == sorted(failed)
    for r in result["runs"]:
        done = await _ended(api, r["rerun_id"])
        assert done["status"] == "succeeded" and done["rerun_of"] == r["id"]
    assert ran(files["log"]) == {"fetch_page": 3, "parse_page": 3, "enrich_page": 6,
                                 "store_page": 3}  # fmt: skip
    retried = await api.post("/v1/runs/bulk/rerun", json=body, headers=key)
    assert retried.json() == result and retried.headers["idempotent-replayed"] == "true"
    conflict = await api.post("/v1/runs/bulk/rerun", json={**body, "from": "start"}, headers=key)
    assert conflict.status_code == 409
    page = (await api.get("/v1/runs", params={"tag": "batch:bulk-rr"})).json()["runs"]
    assert len(page) == 6  # the three, and one rerun each: none twice


async def test_bulk_requests_that_are_not_right_are_refused(api: httpx.AsyncClient) -> None:
    cases = [
        {"filter": {}},
        {"filter": {"tag": "a:b"}, "limit": 10_001},
        {"filter": {"tag": "a:b"}, "dry_run": "yes"},
        {"filter": {"status": "sleeping"}},
        {"filter": {"colour": "red"}},
        {"filter": {"tag": "a:b"}, "from": "middle"},
        {"filter": {"ids": "run_x"}},
        [],
    ]
    for body in cases:
        path = "/v1/runs/bulk/rerun"
        resp = await api.post(path, json=body)
        assert (resp.status_code, resp.json()["error"]["code"]) == (400, "invalid_request"), body


async def test_a_schedule_is_paused_and_resumed(api: httpx.AsyncClient) -> None:
    made = (await api.post("/v1/schedules", json={"workflow": "echo", "cron": "0 0 1 1 *",
                                                  "input": {"text": "x"}})).json()  # fmt: skip
    assert made["paused"] is False
    paused = await api.post(f"/v1/schedules/{made['id']}/pause")
    assert paused.status_code == 200 and paused.json()["paused"] is True
    assert (await api.get(f"/v1/schedules/{made['id']}")).json()["paused"] is True
    assert (await api.post(f"/v1/schedules/{made['id']}/pause", headers=B)).status_code == 404
    resumed = (await api.post(f"/v1/schedules/{made['id']}/resume")).json()
    assert resumed["paused"] is False and resumed["next_run_at"] == made["next_run_at"]
    await api.delete(f"/v1/schedules/{made['id']}")
    assert (await api.post(f"/v1/schedules/{made['id']}/resume")).status_code == 404


async def test_the_cluster_shows_workers_queue_and_budgets(api: httpx.AsyncClient) -> None:
    state = (await api.get("/v1/cluster")).json()
    assert set(state) == {"workers", "queue", "leases", "llm_budgets"}
    assert set(state["queue"]) == {"depth", "oldest_age_seconds"}
    worker = state["workers"][0]
    assert worker["alive"] and worker["hosts"] == "inline" and worker["run_hosts"]
    assert set(worker["run_hosts"][0]) == {"name", "runs", "age_seconds", "up", "healthy"}
    assert (await api.get("/v1/cluster", headers={})).status_code in (200, 401)


async def test_a_rerun_pays_its_tenants_quota(make_api: ApiFactory, files: dict[str, str]) -> None:
    limits = '{"ops-q": {"runs_per_minute": 1}}'
    async with make_api(GENX_API_KEYS=f"{KEY_Q}:ops-q", GENX_TENANT_LIMITS=limits) as api:
        api.headers.update({"Authorization": f"Bearer {KEY_Q}"})
        run = await _failed_ingest(api, files)  # the minute's one run
        resp = await api.post(f"/v1/runs/{run['id']}/rerun", json={})
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "quota_exceeded"
        assert "retry-after" in resp.headers
        assert (await api.get(f"/v1/runs/{run['id']}")).json()["reruns"] == []  # none made
        bulk = (await api.post("/v1/runs/bulk/rerun", json={"filter": {"ids": [run["id"]]}})).json()
        assert (bulk["matched"], bulk["done"]) == (1, 0)
        assert bulk["runs"][0]["error"]["code"] == "quota_exceeded"
