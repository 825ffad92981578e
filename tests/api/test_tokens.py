"""Run tokens over HTTP: what one grants (reading its run), everything it does not, and how a bad
one is refused; the token format itself; CORS; the viewer's files; tokens kept out of logs."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from datetime import datetime
from typing import Any

import httpx
import pytest

from gateway.errors import TokenExpired, TokenInvalid
from gateway.tokens import mint, verify
from genx_ray.model import REDACTED, redact
from genx_ray.store import keys

from .conftest import ApiFactory, sse

KEYS = {"GENX_API_KEYS": "ka-0123456789abcdef:acme,kb-0123456789abcdef:globex"}
A, B = (
    {"Authorization": "Bearer ka-0123456789abcdef"},
    {"Authorization": "Bearer kb-0123456789abcdef"},
)
SECRET = "a-test-secret-of-at-least-32-characters"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def start(api: httpx.AsyncClient, text: str = "t", **kw: Any) -> dict[str, Any]:
    resp = await api.post("/v1/workflows/echo/runs?wait=10", json={"input": {"text": text}}, **kw)
    assert resp.status_code == 200, resp.text
    run: dict[str, Any] = resp.json()
    return run


def refused(resp: httpx.Response, code: str, token: str | None = None) -> bool:
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["code"] == code, resp.text
    assert token is None or token not in resp.text  # no error repeats a credential
    return True


# -- the format ----------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_a_token_verifies_with_its_secret_until_it_expires() -> None:
    token = mint(b"s1", "run_x", "acme", 2_000)
    claims = verify(b"s1", token, now=1_999.5)
    assert (claims.run_id, claims.tenant, claims.expires_at) == ("run_x", "acme", 2_000)
    assert token.startswith("gxt_")
    with pytest.raises(TokenExpired):
        verify(b"s1", token, now=2_000)
    with pytest.raises(TokenInvalid):
        verify(b"s2", token, now=0)  # another secret


def test_any_change_to_a_token_makes_it_invalid() -> None:
    token = mint(b"s1", "run_x", "acme", 2_000)
    body, sig = token[4:].split(".")
    forged_payload = _b64(json.dumps({"r": "run_y", "t": "acme", "e": 2_000}).encode())
    longer = _b64(json.dumps({"r": "run_x", "t": "acme", "e": 9_999}).encode())
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    bad = [
        f"gxt_{forged_payload}.{sig}", f"gxt_{longer}.{sig}", f"gxt_{body}.{flipped}",
        f"gxt_{body}", f"gxt_{body}.", f"gxt_.{sig}", f"gxt_{body}.{sig}.x", body, "",
        f"gxt_{body}={sig}", f"gxt_{body}.{sig}!", "gxt_" + "A" * 5000 + "." + sig,
        f"gxt_{_b64(b'not json')}.{_b64(b'x' * 32)}",
    ]  # fmt: skip
    for forged in bad:
        with pytest.raises(TokenInvalid):
            verify(b"s1", forged, now=0)
    # A payload that is signed but not a token's (no forger can make one; still refused cleanly)
    import hashlib
    import hmac

    odd = b'{"r":1}'
    odd_sig = hmac.new(b"s1", odd, hashlib.sha256).digest()
    with pytest.raises(TokenInvalid):
        verify(b"s1", f"gxt_{_b64(odd)}.{_b64(odd_sig)}", now=0)


def test_tokens_are_redacted_from_log_lines() -> None:
    token = mint(b"s", "run_x", "acme", 2_000)
    line = f'127.0.0.1 - "GET /v1/runs/run_x/events?after=1-0&token={token} HTTP/1.1" 200'
    assert token not in redact(line) and "token=" + REDACTED in redact(line)
    assert redact(f"Authorization: Bearer {token}") == f"Authorization: Bearer {REDACTED}"
    assert redact("/v1/runs?token=whatever&x=1") == f"/v1/runs?token={REDACTED}&x=1"


async def test_the_access_log_never_shows_a_token(
    make_api: ApiFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_api() as api:
        run = await start(api)
        token = run["stream_token"]
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        logging.getLogger("uvicorn.access").info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET",
            f"/ui/runs/{run['id']}?token={token}", "1.1", 200,
        )  # fmt: skip
        logging.getLogger("uvicorn.error").warning("odd request ?token=%s", token)
        logging.getLogger("uvicorn.error").warning(f"Authorization: Bearer {token}")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("uvicorn")]
    assert len(lines) == 3 and run["id"] in lines[0]
    assert all(token not in line and REDACTED in line for line in lines), lines


# -- what a token grants -------------------------------------------------------------------------


async def test_creating_a_run_returns_a_token_that_reads_it(make_api: ApiFactory) -> None:
    async with make_api(**KEYS) as api:
        queued = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "q"}}, headers=A)
        assert queued.status_code == 202 and queued.json()["stream_token"].startswith("gxt_")
        run = await start(api, headers=A)
        key = {"Idempotency-Key": f"k-{run['id']}"}
        first = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "i"}},
                               headers={**A, **key})  # fmt: skip
        again = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "i"}},
                               headers={**A, **key})  # fmt: skip
        assert again.status_code == 200 and again.json()["stream_token"]
        assert again.json()["id"] == first.json()["id"]
        streamed = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "s"}},
                                  headers={**A, "Accept": "text/event-stream"})  # fmt: skip
        streamed_id = streamed.headers["Location"].rsplit("/", 1)[1]
        header_token = {"token": streamed.headers["Genx-Stream-Token"]}  # no body to carry it
        read = await api.get(f"/v1/runs/{streamed_id}", params=header_token)
        assert read.status_code == 200 and read.json()["status"] == "succeeded"

        token = run["stream_token"]
        by_key = (await api.get(f"/v1/runs/{run['id']}", headers=A)).json()
        assert "stream_token" not in by_key  # only the responses that create a run carry one
        ways: list[dict[str, Any]] = [{"params": {"token": token}}, {"headers": bearer(token)}]
        for creds in ways:
            got = await api.get(f"/v1/runs/{run['id']}", **creds)
            assert got.status_code == 200 and got.json() == by_key
            events = await api.get(f"/v1/runs/{run['id']}/events", **creds)
            assert events.status_code == 200
            assert [f["event"] for f in sse(events.text)][-1] == "run.succeeded"
            nd = await api.get(f"/v1/runs/{run['id']}/events", headers={
                **creds.get("headers", {}), "Accept": "application/x-ndjson"},
                params=creds.get("params"))  # fmt: skip
            assert nd.status_code == 200
            assert [json.loads(line)["id"] for line in nd.text.splitlines()] == [
                f["id"] for f in sse(events.text)
            ]
            page = await api.get(f"/ui/runs/{run['id']}", **creds)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


async def test_a_token_grants_nothing_but_reading_its_own_run(make_api: ApiFactory) -> None:
    async with make_api(**KEYS) as api:
        run, other = await start(api, "mine", headers=A), await start(api, "other", headers=A)
        token = run["stream_token"]
        ways: list[dict[str, Any]] = [{"params": {"token": token}}, {"headers": bearer(token)}]
        for creds in ways:
            for path in (f"/v1/runs/{other['id']}", f"/v1/runs/{other['id']}/events",
                         f"/ui/runs/{other['id']}"):  # fmt: skip
                resp = await api.get(path, **creds)
                if path.startswith("/ui/"):  # the page loads, with the refusal as its status
                    assert resp.status_code == 401 and token not in resp.text
                else:
                    assert refused(resp, "token_wrong_run", token)
            api_key_only: list[tuple[str, str, dict[str, Any]]] = [
                ("get", "/v1/runs", {}),
                ("get", "/v1/workflows", {}),
                ("post", f"/v1/runs/{run['id']}/cancel", {}),
                ("post", f"/v1/runs/{run['id']}/tokens", {"json": {}}),
                ("post", f"/v1/runs/{run['id']}/input", {"json": {"input": {}}}),
                ("post", "/v1/workflows/echo/runs", {"json": {"input": {"text": "x"}}}),
            ]
            for method, path, kw in api_key_only:
                kw = {**kw, **creds}
                resp = await getattr(api, method)(path, **kw)
                assert refused(resp, "token_not_allowed", token), (method, path)
        # ...even next to a good API key: a token is never taken where a key is needed
        both = await api.get("/v1/runs", headers=A, params={"token": token})
        assert refused(both, "token_not_allowed", token)
        # ...and it does not widen an API key: tenant globex still cannot read acme's run
        with_b = await api.get(f"/v1/runs/{run['id']}", headers=B)
        assert with_b.status_code == 404


async def test_an_answer_token_answers_its_run_and_reads_it_and_nothing_more(
    make_api: ApiFactory,
) -> None:
    async with make_api(**KEYS) as api:
        made = await api.post("/v1/workflows/review/runs", json={"input": {"n": 1}}, headers=A)
        run_id = made.json()["id"]
        minted = await api.post(f"/v1/runs/{run_id}/tokens", json={"scope": "answer"}, headers=A)
        assert minted.status_code == 200 and minted.json()["scope"] == "answer"
        token = minted.json()["token"]
        other = await start(api, "other", headers=A)
        for bad in ({"scope": "admin"}, {"scope": None}):
            resp = await api.post(f"/v1/runs/{run_id}/tokens", json=bad, headers=A)
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request"
        deadline = time.monotonic() + 20
        while (await api.get(f"/v1/runs/{run_id}", params={"token": token})).json()[
            "status"
        ] != "waiting":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        body = {"input": {"approve": True, "comment": "from the link"}}
        wrong = await api.post(f"/v1/runs/{other['id']}/input", json=body, params={"token": token})
        assert refused(wrong, "token_wrong_run", token)
        for method, path in (("post", f"/v1/runs/{run_id}/cancel"), ("get", "/v1/runs"),
                             ("post", f"/v1/runs/{run_id}/tokens")):  # fmt: skip
            assert refused(await getattr(api, method)(path, headers=bearer(token)),
                           "token_not_allowed", token)  # fmt: skip
        stream_token = made.json()["stream_token"]  # read-only: it cannot answer
        ro = await api.post(f"/v1/runs/{run_id}/input", json=body, params={"token": stream_token})
        assert refused(ro, "token_not_allowed", stream_token)
        ok = await api.post(f"/v1/runs/{run_id}/input", json=body, headers=bearer(token))
        assert ok.status_code == 200, ok.text


async def test_bad_tokens_are_refused_with_a_code_saying_why(make_api: ApiFactory) -> None:
    async with make_api(**KEYS, GENX_TOKEN_SECRET=SECRET) as api:
        run = await start(api, headers=A)
        token = run["stream_token"]
        expired = mint(SECRET.encode(), run["id"], "acme", int(time.time()) - 1)
        foreign = mint(b"another-gateway's-secret-entirely!", run["id"], "acme", 2**40)
        body, sig = token[4:].split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "==="))
        tampered = "gxt_" + _b64(json.dumps({**claims, "e": 2**40}).encode()) + "." + sig
        cases = [
            (expired, "token_expired"), (foreign, "token_invalid"), (tampered, "token_invalid"),
            ("gxt_garbage", "token_invalid"), ("ka", "token_invalid"), ("", "token_invalid"),
        ]  # fmt: skip
        for bad, code in cases:
            for path in (f"/v1/runs/{run['id']}", f"/v1/runs/{run['id']}/events"):
                assert refused(await api.get(path, params={"token": bad}), code, bad or None)
                if bad.startswith("gxt_"):  # a bearer that is no token is an (unknown) API key
                    assert refused(await api.get(path, headers=bearer(bad)), code, bad)
                # A bad token is checked even beside a good key, never silently ignored
                both = await api.get(path, headers=A, params={"token": bad})
                assert refused(both, code, bad or None)
            page = await api.get(f"/ui/runs/{run['id']}", params={"token": bad})
            assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
        no_creds = await api.get(f"/v1/runs/{run['id']}")
        assert refused(no_creds, "unauthorized")
        assert (await api.get(f"/ui/runs/{run['id']}")).status_code == 401
        unknown = await api.get("/v1/runs/run_nope", params={"token": token})
        assert refused(unknown, "token_wrong_run", token)


async def test_without_api_keys_all_stays_open_and_tokens_still_work(
    make_api: ApiFactory,
) -> None:
    async with make_api() as api:
        run, other = await start(api), await start(api)
        token = run["stream_token"]
        assert (await api.get(f"/v1/runs/{run['id']}")).status_code == 200
        assert (await api.get("/v1/runs")).status_code == 200
        assert (await api.get(f"/v1/runs/{run['id']}", params={"token": token})).status_code == 200
        assert (await api.get(f"/v1/runs/{run['id']}", headers=bearer(token))).status_code == 200
        wrong = await api.get(f"/v1/runs/{other['id']}", params={"token": token})
        assert refused(wrong, "token_wrong_run", token)
        bad = await api.get(f"/v1/runs/{run['id']}/events", params={"token": token[:-3] + "abc"})
        assert refused(bad, "token_invalid")
        listed = await api.get("/v1/runs", params={"token": token})
        assert refused(listed, "token_not_allowed", token)
        minted = await api.post(f"/v1/runs/{run['id']}/tokens")  # open: no key needed
        assert minted.status_code == 200
        assert (await api.get(f"/ui/runs/{run['id']}")).status_code == 200


# -- minting -------------------------------------------------------------------------------------


async def test_minting_a_token_with_a_ttl(make_api: ApiFactory) -> None:
    async with make_api(**KEYS, GENX_TOKEN_TTL="600") as api:
        run = await start(api, headers=A)
        path = f"/v1/runs/{run['id']}/tokens"
        for body, lifetime in ((None, 600), ({}, 600), ({"ttl": 30}, 30), ({"ttl": 600}, 600)):
            before = time.time()
            resp = await api.post(path, headers=A, json=body)
            assert resp.status_code == 200, resp.text
            minted = resp.json()
            assert set(minted) == {"token", "expires_at", "scope"} and minted["scope"] == "read"
            assert minted["expires_at"].endswith("Z")
            expires = datetime.fromisoformat(minted["expires_at"]).timestamp()
            assert before + lifetime - 1 <= expires <= time.time() + lifetime + 1
            got = await api.get(f"/v1/runs/{run['id']}", params={"token": minted["token"]})
            assert got.status_code == 200
        for bad in ({"ttl": 0}, {"ttl": 601}, {"ttl": "30"}, {"ttl": True}, {"ttl": 1.5},
                    {"ttl": 30, "run": "x"}, [30]):  # fmt: skip
            resp = await api.post(path, headers=A, json=bad)
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request"
        assert (await api.post(path, headers=B)).status_code == 404  # another tenant's run
        assert (await api.post("/v1/runs/run_nope/tokens", headers=A)).status_code == 404
        assert refused(await api.post(path), "unauthorized")


async def test_every_gateway_on_the_redis_accepts_every_token(
    make_api: ApiFactory, redis: Any
) -> None:
    async with make_api(**KEYS) as one, make_api(**KEYS) as two:
        run = await start(one, headers=A)
        token = run["stream_token"]
        resp = await two.get(f"/v1/runs/{run['id']}/events", params={"token": token})
        assert resp.status_code == 200 and sse(resp.text)[-1]["event"] == "run.succeeded"
        minted = (await two.post(f"/v1/runs/{run['id']}/tokens", headers=A)).json()["token"]
        assert (await one.get(f"/v1/runs/{run['id']}", params={"token": minted})).status_code == 200
    assert await redis.get(keys.TOKEN_SECRET)  # kept in Redis: a restarted gateway has it too
    async with make_api(**KEYS) as restarted:
        resp = await restarted.get(f"/v1/runs/{run['id']}", params={"token": token})
        assert resp.status_code == 200
    async with make_api(**KEYS, GENX_TOKEN_SECRET=SECRET) as configured:
        resp = await configured.get(f"/v1/runs/{run['id']}", params={"token": token})
        assert refused(resp, "token_invalid", token)  # another secret: not this gateway's token


# -- browsers ------------------------------------------------------------------------------------


async def test_cors_only_for_the_configured_origins(make_api: ApiFactory) -> None:
    app_origin = "https://app.example.com"
    preflight = {
        "Origin": app_origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, last-event-id",
    }  # fmt: skip
    async with make_api(GENX_CORS_ORIGINS=app_origin) as api:
        ok = await api.options("/v1/workflows/echo/runs", headers=preflight)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == app_origin
        allowed = ok.headers["access-control-allow-headers"].lower()
        assert {"authorization", "last-event-id", "content-type"} <= {
            h.strip() for h in allowed.split(",")
        }
        created = await api.post("/v1/workflows/echo/runs", json={"input": {"text": "c"}},
                                 headers={"Origin": app_origin})  # fmt: skip
        assert created.headers["access-control-allow-origin"] == app_origin
        exposed = created.headers["access-control-expose-headers"].lower()
        assert "location" in exposed and "genx-stream-token" in exposed
        js = await api.get("/ui/genx.js", headers={"Origin": app_origin})  # importable cross-origin
        assert js.headers["access-control-allow-origin"] == app_origin
        evil = await api.options(
            "/v1/workflows/echo/runs", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in evil.headers
        page = await api.get(f"/ui/runs/{created.json()['id']}")
        assert f"frame-ancestors {app_origin}" in page.headers["content-security-policy"]
    async with make_api() as closed:
        resp = await closed.get("/v1/workflows", headers={"Origin": app_origin})
        assert "access-control-allow-origin" not in resp.headers


async def test_a_star_origin_never_lets_any_site_frame_the_viewer(make_api: ApiFactory) -> None:
    async with make_api(GENX_CORS_ORIGINS="*,https://app.example.com") as api:
        run = await start(api)
        page = await api.get(f"/ui/runs/{run['id']}", params={"token": run["stream_token"]})
        csp = page.headers["content-security-policy"]
        assert csp.endswith("frame-ancestors https://app.example.com"), csp
    async with make_api(GENX_CORS_ORIGINS="*") as api:
        run = await start(api)
        page = await api.get(f"/ui/runs/{run['id']}", params={"token": run["stream_token"]})
        assert page.headers["content-security-policy"].endswith("frame-ancestors 'none'")


async def test_the_viewer_and_its_files_are_served_safely(api: httpx.AsyncClient) -> None:
    run = await start(api)
    page = await api.get(f"/ui/runs/{run['id']}", params={"token": run["stream_token"]})
    assert page.status_code == 200 and 'id="app"' in page.text and "viewer.js" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe" not in csp
    assert "frame-ancestors 'none'" in csp
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "<script>" not in page.text  # no inline script: the CSP would refuse it anyway
    assert run["stream_token"] not in page.text  # the page is the same bytes for every run
    assert (await api.get("/ui/runs/run_nope")).status_code == 404
    scripts = ("genx.js", "viewer.js", "run-view.js", "console.js")
    for name, kind in [*((s, "text/javascript") for s in scripts), ("viewer.css", "text/css"),
                       ("console.css", "text/css")]:  # fmt: skip
        resp = await api.get(f"/ui/{name}")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith(kind)
        again = await api.get(f"/ui/{name}", headers={"If-None-Match": resp.headers["etag"]})
        assert again.status_code == 304
    js = "".join([(await api.get(f"/ui/{name}")).text for name in scripts])
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js
    assert "document.write" not in js and "outerHTML" not in js
    for missing in ("viewer.html", "console.html", "nope.js", "..%2Fapp.py"):
        assert (await api.get(f"/ui/{missing}")).status_code == 404
    # The console: the same bytes for everyone, the same policy, no inline script.
    console = await api.get("/ui/")
    assert console.status_code == 200 and 'id="api-key"' in console.text
    assert console.headers["content-security-policy"] == csp
    assert "<script>" not in console.text and console.headers["cache-control"] == "no-store"
    moved = await api.get("/ui", follow_redirects=False)
    assert moved.status_code == 308 and moved.headers["location"] == "ui/"


def test_genx_js_listens_for_every_event_type() -> None:
    """EventSource delivers only the named event types it listens for: genx.js must name every
    member of the event union (and the terminal ones as terminal)."""
    from gateway.ui import STATIC
    from genx_ray.model import EVENT_TYPES, TERMINAL_TYPES

    source = (STATIC / "genx.js").read_text()

    def js_list(name: str) -> set[str]:
        found = re.search(rf"export const {name} = \[(.*?)\];", source, re.S)
        assert found, name
        return set(re.findall(r'"([^"]+)"', found[1]))

    assert set(EVENT_TYPES) <= js_list("EVENT_TYPES")
    assert js_list("TERMINAL_TYPES") == set(TERMINAL_TYPES)
