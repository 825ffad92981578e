"""Durable waits over HTTP: answering a run's input, delayed runs, schedules; every bad request
gets its code and changes nothing."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from .conftest import ApiFactory, sse


async def _until_status(api: httpx.AsyncClient, run_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        run: dict[str, Any] = (await api.get(f"/v1/runs/{run_id}")).json()
        if run["status"] == status:
            return run
        assert time.monotonic() < deadline, f"{run_id} is {run['status']}, never {status}"
        await asyncio.sleep(0.05)


async def _waiting_review(api: httpx.AsyncClient, **inp: Any) -> dict[str, Any]:
    resp = await api.post("/v1/workflows/review/runs", json={"input": {"n": 1, **inp}})
    assert resp.status_code == 202, resp.text
    return await _until_status(api, resp.json()["id"], "waiting")


async def _events(api: httpx.AsyncClient, run_id: str) -> list[str]:
    return [f["event"] for f in sse((await api.get(f"/v1/runs/{run_id}/events")).text)]


async def test_input_posted_to_a_waiting_run_is_checked_then_carries_it_on(
    api: httpx.AsyncClient,
) -> None:
    run = await _waiting_review(api)
    wait = run["waiting"]
    assert wait["kind"] == "input" and wait["prompt"] == "approve?"
    assert wait["input_schema"]["required"] == ["approve"] and wait["input_id"].startswith("inp_")
    url = f"/v1/runs/{run['id']}/input"

    bad = await api.post(url, json={"input": {"approve": "maybe"}})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_input"
    assert bad.json()["error"]["message"] == "input: approve: 'maybe' is not of type 'boolean'"
    other = await api.post(url, json={"input": {"approve": True}, "input_id": "inp_other"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "not_waiting_for_input"
    for body in ({}, {"input": {"approve": True}, "extra": 1}, [1]):
        assert (await api.post(url, json=body)).status_code == 400
    assert (await api.get(f"/v1/runs/{run['id']}")).json()["status"] == "waiting"  # unchanged

    ok = await api.post(url, json={"input": {"approve": True, "comment": "go"},
                                   "input_id": wait["input_id"]})  # fmt: skip
    assert ok.status_code == 200 and ok.json()["status"] in ("queued", "running", "succeeded")
    done = await _until_status(api, run["id"], "succeeded")
    assert done["output"] == {"decision": {"approve": True, "comment": "go"}, "after": 1}
    assert done["waiting"] is None
    late = await api.post(url, json={"input": {"approve": True}})
    assert late.status_code == 409 and late.json()["error"]["code"] == "not_waiting_for_input"
    assert await _events(api, run["id"]) == [
        "run.queued", "run.started", "step.started", "step.completed", "progress",
        "run.waiting", "input.requested", "input.received", "run.resumed", "run.started",
        "step.completed", "step.started", "step.completed", "run.succeeded",
    ]  # fmt: skip


async def test_input_to_another_tenants_run_is_404(make_api: ApiFactory) -> None:
    async with make_api(GENX_API_KEYS="ka-0123456789abcdef:acme,kb-0123456789abcdef:globex") as api:
        a, b = (
            {"Authorization": "Bearer ka-0123456789abcdef"},
            {"Authorization": "Bearer kb-0123456789abcdef"},
        )
        resp = await api.post("/v1/workflows/review/runs", json={"input": {"n": 1}}, headers=a)
        run_id = resp.json()["id"]
        token = resp.json()["stream_token"]
        api.headers.update(a)
        await _until_status(api, run_id, "waiting")
        del api.headers["Authorization"]
        body = {"input": {"approve": True}}
        theirs = await api.post(f"/v1/runs/{run_id}/input", json=body, headers=b)
        assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "run_not_found"
        readonly = await api.post(f"/v1/runs/{run_id}/input?token={token}", json=body)
        assert readonly.status_code == 401  # a run token reads; it does not answer
        assert (await api.post(f"/v1/runs/{run_id}/input", json=body, headers=a)).status_code == 200


async def test_an_unanswered_input_times_out_into_the_workflow(api: httpx.AsyncClient) -> None:
    run = await _waiting_review(api, deadline=1.0)
    assert run["waiting"]["deadline"] is not None
    done = await _until_status(api, run["id"], "succeeded")
    assert done["output"] == {"decision": None}


async def test_a_waiting_run_is_cancelled_at_once(api: httpx.AsyncClient) -> None:
    run = await _waiting_review(api)
    resp = await api.post(f"/v1/runs/{run['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"


async def test_a_delayed_run_is_scheduled_until_its_time(api: httpx.AsyncClient) -> None:
    resp = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "later"},
                                                           "delay_seconds": 1.5})  # fmt: skip
    assert resp.status_code == 202
    run = resp.json()
    assert run["status"] == "scheduled" and run["start_at"] is not None
    assert (await api.get(f"/v1/runs/{run['id']}")).json()["status"] == "scheduled"
    done = await _until_status(api, run["id"], "succeeded")
    assert done["output"] == "LATER"
    assert await _events(api, run["id"]) == [
        "run.scheduled", "run.queued", "run.started", "step.started", "step.completed",
        "run.succeeded",
    ]  # fmt: skip
    created, started = (time.mktime(time.strptime(done[k][:19], "%Y-%m-%dT%H:%M:%S"))
                        for k in ("created_at", "started_at"))  # fmt: skip
    assert 1 <= started - created <= 3
    at = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "x"},
                                                         "start_at": "2000-01-01T00:00:00Z"})  # fmt: skip
    assert at.json()["status"] == "queued"  # a time gone by: now


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"start_at": "tomorrow"}, "start_at"),
        ({"start_at": "2030-01-01T09:00:00"}, "start_at"),  # no time zone
        ({"start_at": "2099-01-01T09:00:00Z"}, "start_at"),  # more than a year ahead
        ({"delay_seconds": "5"}, "delay_seconds"),
        ({"delay_seconds": -1}, "delay_seconds"),
        ({"delay_seconds": 5, "start_at": "2030-01-01T09:00:00Z"}, "start_at"),
    ],
)
async def test_a_bad_start_time_is_422_naming_the_field(
    api: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    before = len((await api.get("/v1/runs", params={"limit": 500})).json()["runs"])
    resp = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "x"}, **body})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_input"
    assert resp.json()["error"]["message"].startswith(f"{field}: ")
    assert len((await api.get("/v1/runs", params={"limit": 500})).json()["runs"]) == before


async def test_a_schedule_starts_a_run_each_tick_until_deleted(make_api: ApiFactory) -> None:
    async with make_api(GENX_SCHEDULE_MIN_INTERVAL="1") as api:
        await _each_tick_until_deleted(api)


async def _each_tick_until_deleted(api: httpx.AsyncClient) -> None:
    body = {"workflow": "echo", "cron": "* * * * * */1", "input": {"text": "tick"},
            "timezone": "America/New_York", "overlap": "allow"}  # fmt: skip
    resp = await api.post("/v1/schedules", json=body)
    assert resp.status_code == 201, resp.text
    schedule = resp.json()
    assert resp.headers["location"] == f"/v1/schedules/{schedule['id']}"
    assert {k: schedule[k] for k in body} == body and schedule["next_run_at"]
    assert schedule["id"] in {s["id"] for s in (await api.get("/v1/schedules")).json()}
    assert (await api.get(f"/v1/schedules/{schedule['id']}")).json()["cron"] == body["cron"]
    await asyncio.sleep(2.6)
    assert (await api.delete(f"/v1/schedules/{schedule['id']}")).status_code == 204
    gone = await api.get(f"/v1/schedules/{schedule['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "schedule_not_found"
    runs = [r for r in (await api.get("/v1/runs", params={"workflow": "echo", "limit": 200})).json()
            ["runs"] if r["schedule_id"] == schedule["id"]]  # fmt: skip
    assert 2 <= len(runs) <= 3
    for run in runs:
        assert (await _until_status(api, run["id"], "succeeded"))["output"] == "TICK"
    await asyncio.sleep(1.5)
    later = [r for r in (await api.get("/v1/runs", params={"workflow": "echo", "limit": 200}))
             .json()["runs"] if r["schedule_id"] == schedule["id"]]  # fmt: skip
    assert len(later) == len(runs)  # none after the delete


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        ({"workflow": "echo", "cron": "every day"}, 422, "invalid_input", "cron: "),
        ({"workflow": "echo", "cron": "0 9 * * *", "timezone": "Mars/Base"}, 422,
         "invalid_input", "timezone: "),
        ({"workflow": "echo", "cron": "0 9 * * *", "input": {"text": 5}}, 422, "invalid_input",
         "text"),
        ({"workflow": "nope", "cron": "0 9 * * *"}, 404, "workflow_not_found", ""),
        ({"workflow": "echo"}, 400, "invalid_request", "expected fields"),
        ({"workflow": "echo", "cron": "0 9 * * *", "when": 1}, 400, "invalid_request", ""),
        ({"workflow": "echo", "cron": 5}, 400, "invalid_request", ""),
        ({"workflow": "echo", "cron": "0 0 1 1 * 0 2020"}, 422, "invalid_input",
         "cron: '0 0 1 1 * 0 2020' never ticks again"),  # no next tick: never a 500
        ({"workflow": "echo", "cron": "* * * * * *"}, 422, "invalid_input",
         "GENX_SCHEDULE_MIN_INTERVAL"),  # every second, under the 60 s floor
        ({"workflow": "echo", "cron": "0 9 * * *", "overlap": "sometimes"}, 422,
         "invalid_input", "overlap: "),
    ],
)  # fmt: skip
async def test_a_bad_schedule_gets_its_code_and_creates_nothing(
    api: httpx.AsyncClient, body: dict[str, Any], status: int, code: str, message: str
) -> None:
    before = len((await api.get("/v1/schedules")).json())
    resp = await api.post("/v1/schedules", json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code and message in resp.json()["error"]["message"]
    assert len((await api.get("/v1/schedules")).json()) == before


async def test_schedules_are_per_tenant(make_api: ApiFactory) -> None:
    async with make_api(GENX_API_KEYS="ka-0123456789abcdef:acme,kb-0123456789abcdef:globex") as api:
        a, b = (
            {"Authorization": "Bearer ka-0123456789abcdef"},
            {"Authorization": "Bearer kb-0123456789abcdef"},
        )
        body = {"workflow": "echo", "cron": "0 9 * * *", "input": {"text": "a"}}
        made = (await api.post("/v1/schedules", json=body, headers=a)).json()
        assert (await api.get(f"/v1/schedules/{made['id']}", headers=b)).status_code == 404
        assert (await api.delete(f"/v1/schedules/{made['id']}", headers=b)).status_code == 404
        assert (await api.get("/v1/schedules", headers=b)).json() == []
        assert (await api.delete(f"/v1/schedules/{made['id']}", headers=a)).status_code == 204


async def test_a_tenants_schedules_are_capped_paged_and_say_when_disabled(
    make_api: ApiFactory, redis: Any
) -> None:
    from genx_ray.store import ScheduleStore

    tenant = f"cap{int(time.time() * 1000)}"
    limits = json.dumps({tenant: {"schedules": 5}})
    key = "cap-key-0123456789ab"
    async with make_api(GENX_API_KEYS=f"{key}:{tenant}", GENX_TENANT_LIMITS=limits) as api:
        auth = {"Authorization": f"Bearer {key}"}
        body = {"workflow": "echo", "cron": "0 9 * * *", "input": {"text": "x"}}
        made = [(await api.post("/v1/schedules", json=body, headers=auth)).json()["id"]
                for _ in range(5)]  # fmt: skip
        over = await api.post("/v1/schedules", json=body, headers=auth)
        assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"
        assert "5 schedules" in over.json()["error"]["message"] and over.headers["retry-after"]
        seen, params = [], {"limit": 2}
        while True:
            page = await api.get("/v1/schedules", params=params, headers=auth)
            assert page.status_code == 200 and len(page.json()) <= 2
            seen += [s["id"] for s in page.json()]
            cursor = page.headers.get("genx-next-cursor")
            if cursor is None:
                assert "link" not in page.headers
                break
            assert 'rel="next"' in page.headers["link"]
            params = {"limit": 2, "cursor": cursor}
        assert seen == made
        bad = await api.get("/v1/schedules", params={"cursor": "nonsense"}, headers=auth)
        assert bad.status_code == 422
        store = ScheduleStore(redis)
        await store.disable(await store.get(made[0]), "its cron has no tick after 2020")
        shown = (await api.get(f"/v1/schedules/{made[0]}", headers=auth)).json()
        assert shown["disabled"] == "its cron has no tick after 2020"
        assert shown["overlap"] == "skip" and shown["last_skipped"] is None
        for schedule_id in made:
            assert (
                await api.delete(f"/v1/schedules/{schedule_id}", headers=auth)
            ).status_code == 204
