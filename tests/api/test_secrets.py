"""Secrets never reach what a run leaves behind: API keys, run tokens and OPENAI_API_KEY are in
none of the run's Redis keys (record, events, journal), its API answers, nor the logs, even when
the workflow's own code quotes them in an error and a log line."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Any

import pytest

from genx_ray.store import keys

from .conftest import ApiFactory, sse


async def _everything_stored(redis: Any, run_id: str) -> str:
    """Every value of every key of the run (they share its hash tag), as text."""
    parts: list[str] = []
    async for key in redis.scan_iter(match=f"*{{{run_id}}}*", count=1000):
        kind = await redis.type(key)
        if kind == "hash":
            parts.append(repr(await redis.hgetall(key)))
        elif kind == "stream":
            parts.append(repr(await redis.xrange(key)))
        elif kind == "string":
            parts.append(repr(await redis.get(key)))
        elif kind == "list":
            parts.append(repr(await redis.lrange(key, 0, -1)))
        elif kind in ("set", "zset"):
            parts.append(
                repr(
                    await redis.zrange(key, 0, -1) if kind == "zset" else await redis.smembers(key)
                )
            )
    assert parts, "the run left nothing in Redis?"
    return "\n".join(parts)


async def test_no_secret_in_the_run_its_events_or_the_logs(
    make_api: ApiFactory,
    redis: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider_key = "sk-" + secrets.token_hex(16)
    api_key = "gk-" + secrets.token_hex(16)
    monkeypatch.setenv("OPENAI_API_KEY", provider_key)
    monkeypatch.setenv("GENX_API_KEYS", f"{api_key}:acme")  # as the worker's process has them
    caplog.set_level(logging.INFO)
    auth = {"Authorization": f"Bearer {api_key}"}
    async with make_api(GENX_API_KEYS=f"{api_key}:acme") as api:
        created = await api.post(
            "/v1/workflows/leaky/runs?wait=20", headers=auth, json={"input": {}}
        )
        run = created.json()
        token = run["stream_token"]
        assert run["status"] == "failed"
        assert "key [redacted] refused" in run["error"]["message"]
        minted = (await api.post(f"/v1/runs/{run['id']}/tokens", headers=auth, json={})).json()
        seen = [
            created.text,
            (await api.get(f"/v1/runs/{run['id']}", params={"token": token})).text,
            (await api.get(f"/v1/runs/{run['id']}/events", params={"token": minted["token"]})).text,
            (await api.get("/v1/runs", headers=auth)).text,
            (
                await api.get(
                    f"/v1/runs/{run['id']}/events",
                    headers={"Authorization": "Bearer " + token + "x"},
                )
            ).text,
        ]
        events = sse(seen[2])
        assert [e["event"] for e in events][-1] == "run.failed"
        assert any(e["event"] == "step.retrying" for e in events)
    stored = await _everything_stored(redis, run["id"])
    assert keys.run(run["id"]) in stored or run["id"] in stored
    logs = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "calling the provider with key [redacted]" in logs  # the workflow's log line, masked
    for secret in (provider_key, api_key, token, minted["token"]):
        assert secret not in stored, secret
        assert secret not in logs, secret
    for text in seen:
        assert provider_key not in text and api_key not in text


async def test_no_secret_in_any_event_a_run_emits_nor_its_output(
    make_api: ApiFactory, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Published data, streamed output, the input a person sends and the run's output: each
    masked where the event is made, whatever field holds the secret."""
    provider_key = "sk-" + secrets.token_hex(16)
    monkeypatch.setenv("OPENAI_API_KEY", provider_key)
    async with make_api() as api:
        chatty = (
            await api.post(
                "/v1/workflows/chatty/runs?wait=20",
                json={"input": {"note": f"Bearer {provider_key[3:]}"}},
            )
        ).json()
        assert chatty["status"] == "succeeded", chatty
        assert chatty["output"] == {"said": "the key is [redacted] ", "key": "[redacted]"}
        review = (await api.post("/v1/workflows/review/runs", json={"input": {"n": 1}})).json()
        await _until_waiting(api, review["id"])
        answer = {"input": {"approve": True, "comment": f"use {provider_key}"}}
        assert (await api.post(f"/v1/runs/{review['id']}/input", json=answer)).status_code == 200
        done = await _until_done(api, review["id"])
        assert done["output"]["decision"]["comment"] == "use [redacted]"
        for run_id in (chatty["id"], review["id"]):
            events = sse((await api.get(f"/v1/runs/{run_id}/events")).text)
            kinds = {e["event"] for e in events}
            assert kinds >= ({"progress", "output", "run.succeeded"} if run_id == chatty["id"]
                             else {"input.received", "run.succeeded"})  # fmt: skip
            for event in events:
                assert provider_key not in json.dumps(event["data"]), event
            # As stored: the events, and the record's output. (The journal keeps what the steps
            # returned, as they returned it: a restarted run replays it; the API never serves it.)
            stored = repr(await redis.xrange(keys.events(run_id)))
            assert provider_key not in stored
            assert provider_key not in str(await redis.hget(keys.run(run_id), "output"))


async def _until_waiting(api: Any, run_id: str) -> None:
    for _ in range(200):
        if (await api.get(f"/v1/runs/{run_id}")).json()["status"] == "waiting":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the run never waited for input")


async def _until_done(api: Any, run_id: str) -> dict[str, Any]:
    for _ in range(200):
        run: dict[str, Any] = (await api.get(f"/v1/runs/{run_id}")).json()
        if run["status"] in ("succeeded", "failed", "cancelled"):
            return run
        await asyncio.sleep(0.05)
    raise AssertionError("the run never ended")
