"""What an attacker tries, and what a careless client sends: tenants cannot meet through names,
malformed bodies and event ids get clear 4xx (never a 500), a resumed stream always ends with the
terminal event, and a 405 says what is allowed."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from genx_ray.flow import registry
from genx_ray.model import ConfigError, RunStatus, Settings
from genx_ray.model import events as ev
from genx_ray.store import EventStore, RunStore, keys

from .conftest import ApiFactory, sse


@pytest.mark.parametrize(
    "tenant", ["acme:wf:eu", "a{b}", "acme/eu", "ac me", "é", "x" * 65, "acme%3Awf", ""]
)
def test_a_tenant_name_outside_the_safe_set_is_refused_at_start(tenant: str) -> None:
    with pytest.raises(ConfigError, match="GENX_API_KEYS") as caught:
        Settings.from_env({"GENX_API_KEYS": f"kA-0123456789abcdef:acme,secret-key-B:{tenant}"})
    assert "secret-key-B" not in str(caught.value)  # a key is never repeated in an error


def test_one_key_for_two_tenants_is_refused() -> None:
    with pytest.raises(ConfigError, match="two tenants"):
        Settings.from_env({"GENX_API_KEYS": "k-0123456789abcdef:acme,k-0123456789abcdef:globex"})


async def test_tenants_whose_names_look_alike_never_see_each_others_runs(
    make_api: ApiFactory,
) -> None:
    base = f"acme{secrets.token_hex(3)}"  # no other test's runs under these names
    names = {"ka-0123456789abcdef": base, "kb-0123456789abcdef": f"{base}.wf",
             "kc-0123456789abcdef": f"{base}-wf"}  # fmt: skip
    async with make_api(GENX_API_KEYS=",".join(f"{k}:{t}" for k, t in names.items())) as api:
        heads = {t: {"Authorization": f"Bearer {k}"} for k, t in names.items()}
        made = {}
        for tenant, head in heads.items():
            resp = await api.post("/v1/workflows/echo/runs?wait=10", headers=head,
                                  json={"input": {"text": tenant}},)  # fmt: skip
            made[tenant] = resp.json()["id"]
            again = await api.post("/v1/workflows/echo/runs", headers={**head, "Idempotency-Key": "k:1"},
                                   json={"input": {"text": tenant}})  # fmt: skip
            assert again.status_code == 202  # one idempotency key, three tenants: three runs
        for tenant, head in heads.items():
            for params in ({}, {"workflow": "echo"}, {"workflow": "wf"}, {"status": "succeeded"}):
                listed = (await api.get("/v1/runs", params=params, headers=head)).json()["runs"]
                assert all(r["input"]["text"] == tenant for r in listed), (tenant, params)
            for other, run_id in made.items():
                if other != tenant:
                    assert (await api.get(f"/v1/runs/{run_id}", headers=head)).status_code == 404


async def test_a_deeply_nested_body_is_400_and_creates_nothing(api: httpx.AsyncClient) -> None:
    before = len((await api.get("/v1/runs", params={"limit": 500})).json()["runs"])
    for depth in (65, 100_000):
        body = '{"input": {"text": "a", "x": ' + "[" * depth + "]" * depth + "}}"
        resp = await api.post("/v1/workflows/echo/runs", content=body)
        assert resp.status_code == 400, resp.text[:300]
        assert resp.json()["error"] == {
            "code": "invalid_request", "message": "the body nests deeper than 64 levels",
        }  # fmt: skip
    ok = '{"input": {"text": ' + "[" * 10 + '"a"' + "]" * 10 + "}}"  # deep enough, bad input
    assert (await api.post("/v1/workflows/echo/runs", content=ok)).status_code == 422
    assert len((await api.get("/v1/runs", params={"limit": 500})).json()["runs"]) == before


@pytest.mark.parametrize(
    ("header", "query"),
    [
        ("99999999999999999999-0", None),  # over 2**64: Redis refuses it
        ("1-99999999999999999999", None),
        (None, "1\n"),
        (None, "1-2-3"),
        ("-1", None),
        (None, "abc"),
    ],
)
async def test_an_event_id_redis_would_refuse_is_400_naming_it(
    api: httpx.AsyncClient, header: str | None, query: str | None
) -> None:
    run = (await api.post("/v1/workflows/echo/runs?wait=10", json={"input": {"text": "a"}})).json()
    resp = await api.get(
        f"/v1/runs/{run['id']}/events",
        headers={"Last-Event-ID": header} if header else {},
        params={"after": query} if query else {},
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request"
    assert "malformed event id" in resp.json()["error"]["message"]


async def test_an_id_past_the_end_still_gets_the_later_events_and_the_end(
    api: httpx.AsyncClient,
) -> None:
    future = "99999999999999-0"
    running = (await api.post("/v1/workflows/ticker/runs",
                              json={"input": {"n": 5, "delay": 0.2}})).json()  # fmt: skip
    await asyncio.sleep(0.3)
    resp = await asyncio.wait_for(
        api.get(f"/v1/runs/{running['id']}/events", headers={"Last-Event-ID": future}), 20
    )
    frames = sse(resp.text)
    assert frames and frames[-1]["event"] == "run.succeeded"  # the live events, then the end
    full = sse((await api.get(f"/v1/runs/{running['id']}/events")).text)
    assert [f["id"] for f in frames] == [f["id"] for f in full][-len(frames) :]
    ended = {future: ["run.succeeded"], full[-1]["id"]: []}  # the end again, or all was seen
    for after, expected in ended.items():  # a finished run: at once
        resp = await asyncio.wait_for(
            api.get(f"/v1/runs/{running['id']}/events", params={"after": after}), 2
        )
        assert resp.status_code == 200 and [f["event"] for f in sse(resp.text)] == expected


async def test_a_reader_resuming_into_a_trimmed_stream_is_told_what_it_missed(
    api: httpx.AsyncClient, redis: Any
) -> None:
    run = (await api.post("/v1/workflows/ticker/runs?wait=20", json={"input": {"n": 20}})).json()
    full = sse((await api.get(f"/v1/runs/{run['id']}/events")).text)
    seen = full[3]["id"]
    await redis.xtrim(keys.events(run["id"]), maxlen=10, approximate=False)  # as MAXLEN does
    resp = await api.get(f"/v1/runs/{run['id']}/events", headers={"Last-Event-ID": seen})
    frames = sse(resp.text)
    assert frames[0]["event"] == "events.truncated"
    assert frames[0]["data"] == {
        "type": "events.truncated", "run_id": run["id"], "ts": frames[0]["data"]["ts"],
        "after": seen, "first_available": full[-10]["id"], "trimmed": len(full) - 10,
    }  # fmt: skip
    assert [f["id"] for f in frames[1:]] == [f["id"] for f in full[-10:]]
    assert frames[0]["id"] < full[-10]["id"] or len(frames[0]["id"]) < len(full[-10]["id"])
    ndjson = await api.get(f"/v1/runs/{run['id']}/events", params={"after": seen},
                           headers={"Accept": "application/x-ndjson"})  # fmt: skip
    assert json.loads(ndjson.text.splitlines()[0])["type"] == "events.truncated"
    after_cut = await api.get(f"/v1/runs/{run['id']}/events", params={"after": full[-10]["id"]})
    assert "events.truncated" not in after_cut.text  # nothing missed from there


class _SlowClient:
    """An HTTP client as a gateway meets it over a slow network: the response's first write (the
    ``retry:`` hint, sent before any event is read) returns only once ``go`` is set."""

    def __init__(self) -> None:
        self.started, self.go, self.done = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.body: list[bytes] = []
        self._asked = False

    async def receive(self) -> dict[str, Any]:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.done.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] != "http.response.body":
            return
        self.body.append(message.get("body", b""))
        if not message.get("more_body", False):
            self.done.set()
        if not self.started.is_set():
            self.started.set()
            await self.go.wait()


async def test_a_stream_trimmed_after_the_reader_resumed_before_its_first_read_still_says_so(
    redis_url: str, redis: Any
) -> None:
    runs, store = RunStore(redis), EventStore(redis)
    run = await runs.create("wf", None)
    await runs.transition(run.id, RunStatus.RUNNING, allowed={RunStatus.QUEUED})
    await store.append(run.id, *[ev.OutputEvent(run_id=run.id, data=i) for i in range(20)])
    await runs.transition(
        run.id, RunStatus.SUCCEEDED, allowed={RunStatus.RUNNING},
        event=ev.RunSucceededEvent(run_id=run.id),
    )  # fmt: skip
    ids = [e.id for e in await store.read(run.id)]
    app = create_app(Settings.from_env({"GENX_REDIS_URL": redis_url}), registry, redis_url)
    client = _SlowClient()
    path = f"/v1/runs/{run.id}/events"
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "headers": [(b"host", b"gw"), (b"last-event-id", ids[3].encode())],
        "server": ("gw", 80), "client": ("127.0.0.1", 1),
    }  # fmt: skip
    async with app.router.lifespan_context(app):
        served = asyncio.create_task(app(scope, client.receive, client.send))
        await asyncio.wait_for(client.started.wait(), 10)  # resumed: its resume point is taken
        await redis.xtrim(keys.events(run.id), maxlen=10, approximate=False)  # as MAXLEN does
        client.go.set()
        await asyncio.wait_for(served, 10)
    frames = sse(b"".join(client.body).decode())
    assert frames[0]["event"] == "events.truncated"  # trimmed after it resumed: told all the same
    assert frames[0]["data"]["after"] == ids[3] and frames[0]["data"]["first_available"] == ids[-10]
    assert [f["id"] for f in frames[1:]] == ids[-10:]


async def test_a_wrong_method_is_405_with_allow(api: httpx.AsyncClient) -> None:
    resp = await api.delete("/v1/workflows")
    assert resp.status_code == 405 and resp.headers["allow"] == "GET"
    assert resp.json()["error"]["code"] == "method_not_allowed"
    resp = await api.put("/v1/schedules")
    assert resp.status_code == 405 and set(resp.headers["allow"].split(", ")) == {"GET", "POST"}


async def _asking_for_input(redis: Any, run_id: str) -> None:
    """Until the run waits for its input. Its ``waiting`` status and its ``input.requested`` event
    are written by one script: once the event is readable, a cancel ends the run at once (while
    it still runs, a cancel is only requested, and the run stays in progress a while)."""

    async def follow() -> None:
        async for entry in EventStore(redis).follow(run_id):
            if entry.type == "input.requested":
                return
        raise AssertionError(f"{run_id} ended without asking for input")

    await asyncio.wait_for(follow(), 20)


async def test_a_tenant_over_its_quota_gets_429_with_retry_after_and_nothing_is_created(
    make_api: ApiFactory, redis: Any
) -> None:
    limits = json.dumps({"*": {"runs_per_minute": 3}, "acme": {"running": 2}})
    async with make_api(GENX_API_KEYS="ka-0123456789abcdef:acme,kb-0123456789abcdef:globex,kc-0123456789abcdef:initech",
                        GENX_TENANT_LIMITS=limits) as api:  # fmt: skip
        b, c = (
            {"Authorization": "Bearer kb-0123456789abcdef"},
            {"Authorization": "Bearer kc-0123456789abcdef"},
        )
        body = {"input": {"text": "x"}}
        made = [await api.post("/v1/workflows/echo/runs", json=body, headers=b) for _ in range(3)]
        assert [r.status_code for r in made] == [202, 202, 202]  # the minute's burst
        over = await api.post("/v1/workflows/echo/runs", json=body, headers=b)
        assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"
        assert 1 <= int(over.headers["retry-after"]) <= 20  # a token back in 20 s (3 a minute)
        listed = (await api.get("/v1/runs", headers=b)).json()["runs"]
        assert len(listed) == 3  # nothing created by the refused request
        replay = await api.post("/v1/workflows/echo/runs", json=body,
                                headers={**b, "Idempotency-Key": "k1"})  # fmt: skip
        assert replay.status_code == 429  # a new run, over the rate
        assert (await api.post("/v1/workflows/echo/runs", json=body, headers=c)).status_code == 202

        # acme: at most two runs in progress (the rate limit does not apply to it)
        a = {"Authorization": "Bearer ka-0123456789abcdef"}
        slow = {"input": {"n": 1}}  # review runs wait for input: in progress until answered
        first = [
            await api.post("/v1/workflows/review/runs", json=slow, headers=a) for _ in range(2)
        ]
        assert [r.status_code for r in first] == [202, 202]
        for run in first:  # both parked on their input: a cancel then ends them at once
            await _until_status(api, run.json()["id"], "waiting", a)
        full = await api.post("/v1/workflows/review/runs", json=slow, headers=a)
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert "2 runs in progress" in full.json()["error"]["message"]
        await _asking_for_input(redis, first[0].json()["id"])
        cancelled = await api.post(f"/v1/runs/{first[0].json()['id']}/cancel", headers=a)
        assert cancelled.json()["status"] == "cancelled"
        again = await api.post("/v1/workflows/review/runs", json=slow, headers=a)
        assert again.status_code == 202  # one finished: room for one more
        for run in (first[1].json(), again.json()):
            await api.post(f"/v1/runs/{run['id']}/cancel", headers=a)


def test_tenant_limits_that_make_no_sense_are_refused_at_start() -> None:
    for bad in ('{"*": {"rpm": 3}}', '{"acme:x": {"running": 1}}', '{"*": {"running": 0}}',
                "[1]", "nope"):  # fmt: skip
        with pytest.raises(ConfigError, match="GENX_TENANT_LIMITS"):
            Settings.from_env({"GENX_TENANT_LIMITS": bad})


async def _until_status(
    api: httpx.AsyncClient, run_id: str, status: str, headers: dict[str, str]
) -> None:
    """Wait (10 s at most) until the run's status is ``status``: a precondition, not a retry."""
    for _ in range(200):
        if (await api.get(f"/v1/runs/{run_id}", headers=headers)).json()["status"] == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} never reached {status}")


@pytest.mark.parametrize(
    ("command", "env", "named"),
    [
        ("gateway", {"GENX_TOKEN_SECRET": "only-twenty-bytes-xx"}, "GENX_TOKEN_SECRET"),
        ("gateway", {"GENX_API_KEYS": "k-short:acme"}, "GENX_API_KEYS"),
        ("gateway", {"GENX_WEBHOOK_URL": "https://hooks.example.com/x"}, "GENX_WEBHOOK_SECRET"),
        ("worker", {"GENX_WEBHOOK_URL": "https://hooks.example.com/x"}, "GENX_WEBHOOK_SECRET"),
    ],
)  # fmt: skip
def test_a_process_with_a_weak_credential_refuses_to_start(
    command: str, env: dict[str, str], named: str, redis_url: str
) -> None:
    import os
    import subprocess
    import sys

    full = {**os.environ, "GENX_REDIS_URL": redis_url, **env}
    full.pop("GENX_WEBHOOK_SECRET", None)
    done = subprocess.run(
        [sys.executable, "-m", "genx_ray.cli", command, *(["--port", "0"] if command == "gateway"
                                                          else [])],
        env=full, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    said = done.stdout + done.stderr
    assert named in said and "Traceback" not in said
    assert "only-twenty" not in said and "k-short" not in said  # never the secret itself


async def test_an_idempotency_key_never_outlives_its_run(make_api: ApiFactory, redis: Any) -> None:
    """Replaying a key after its run expired starts a new run, with a new id, charged to the
    quota: never a run re-created under the old id."""
    from genx_ray.model import new_run_id

    tenant = f"idem{secrets.token_hex(3)}"
    key = "idem-key-0123456789"
    limits = json.dumps({tenant: {"runs_per_minute": 2}})
    async with make_api(GENX_API_KEYS=f"{key}:{tenant}", GENX_TENANT_LIMITS=limits) as api:
        auth = {"Authorization": f"Bearer {key}", "Idempotency-Key": "order-17"}
        body = {"input": {"text": "x"}}
        first = await api.post("/v1/workflows/echo/runs", json=body, headers=auth)
        assert first.status_code == 202
        # Days later the run has expired (its retention is shorter than the key's 24 h): its
        # keys are gone, the key still names it.
        ikey = keys.idempotency(tenant, "echo", "order-17")
        held = json.loads(await redis.get(ikey))
        expired = new_run_id(time.time() - 3 * 24 * 3600)
        await redis.set(ikey, json.dumps({**held, "run": expired}), keepttl=True)
        again = await api.post("/v1/workflows/echo/runs", json=body, headers=auth)
        assert again.status_code == 202 and "idempotent-replayed" not in again.headers
        assert again.json()["id"] not in (expired, first.json()["id"])
        assert await redis.exists(keys.run(expired)) == 0  # never brought back under its id
        replay = await api.post("/v1/workflows/echo/runs", json=body, headers=auth)
        assert replay.headers.get("idempotent-replayed") == "true"
        assert replay.json()["id"] == again.json()["id"]  # the key now names the new run
        over = await api.post("/v1/workflows/echo/runs", json=body,
                              headers={"Authorization": auth["Authorization"]})  # fmt: skip
        assert over.status_code == 429  # the new run was charged: 2 of 2 this minute
