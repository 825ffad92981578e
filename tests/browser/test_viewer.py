"""The run viewer in a real browser: it follows a run through reloads and a gateway restart and
ends with exactly the run's output; run data shows as text; a bad token shows an error state."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from typing import Any

from browser.conftest import API_KEY, CLI, Stack
from browser.wf_viewer import PAYLOAD

ARTIFACTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "test-artifacts"
)


def status_is(page: Any, word: str, timeout: float = 30) -> None:
    page.wait_for_function(
        "w => document.querySelector('#status').textContent === w", arg=word, timeout=timeout * 1000
    )


def output_of(page: Any) -> str:
    return str(page.text_content("#output"))


def wait_for_more_output(page: Any, than: str, timeout: float = 20) -> str:
    """Wait until #output is longer than ``than``, which it must begin with (nothing lost or
    changed by a reload); returns it."""
    page.wait_for_function(
        "n => document.querySelector('#output').textContent.length > n",
        arg=len(than), timeout=timeout * 1000,
    )  # fmt: skip
    text = output_of(page)
    assert text.startswith(than)
    return text


def test_the_viewer_follows_a_run_through_reloads_and_a_gateway_restart(
    stack: Stack, page: Any
) -> None:
    run = stack.api("POST", "/v1/workflows/article/runs", json={"input": {"sections": 4}}).json()
    viewer = f"{stack.url}/ui/runs/{run['id']}?token={run['stream_token']}"
    streams: list[Any] = []  # every request for the run's events the page made

    def on_request(request: Any) -> None:
        if "/events" in request.url:
            streams.append(request)

    page.on("request", on_request)
    page.goto(viewer)
    status_is(page, "running")
    text = wait_for_more_output(page, "")
    for _ in range(2):  # reload mid-run: the page rebuilds from the stream, then follows it
        page.reload()
        text = wait_for_more_output(page, text)
        assert stack.api("GET", f"/v1/runs/{run['id']}").json()["status"] == "running"
    stack.restart_gateway()
    assert stack.api("GET", f"/v1/runs/{run['id']}").json()["status"] == "running"  # mid-run
    text = wait_for_more_output(page, text)  # ...and the page resumed by itself
    status_is(page, "succeeded")

    chunks = stack.output_events(run["id"])
    assert len(chunks) > 20 and all(isinstance(c, str) for c in chunks)
    assert output_of(page) == "".join(chunks)  # every chunk once, in order: none lost or repeated
    # The stream that brought the end was a resumed one: after the last event the page had seen
    # (Last-Event-ID from the browser, or ?after= from genx.js), not a replay from the start.
    last = streams[-1]
    after = re.search(r"[?&]after=([^&]+)", last.url)
    resumed_at = last.all_headers().get("last-event-id") or (after and after[1])
    assert resumed_at and re.fullmatch(r"\d+-\d+", resumed_at), last.url
    page.wait_for_selector("body[data-final=true]")
    timeline = str(page.text_content("#timeline"))
    assert all(p in timeline for p in ('"researching"', '"outlining"', '"writing"'))
    assert "# Durable workflows" in str(page.text_content("#result"))
    assert page.text_content("#llm-calls") not in ("-", "0")
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "viewer.png"), full_page=True)
    assert page.evaluate("window.__violations") == []


def test_run_data_is_shown_as_text_never_run_as_markup(stack: Stack, page: Any) -> None:
    env = {**stack.env, "GENX_API_URL": stack.url, "GENX_API_KEY": API_KEY}
    done = subprocess.run([*CLI, "run", "markup", "--input", '{"times": 3}'], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"^viewer: (\S+)$", done.stderr, re.M)  # `genx run` prints the viewer
    assert found and f"{stack.url}/ui/runs/run_" in found[1] and "?token=gxt_" in found[1]
    page.goto(found[1])
    status_is(page, "succeeded")
    page.wait_for_selector("body[data-final=true]")
    assert output_of(page) == PAYLOAD + " <b>1</b> " + PAYLOAD
    published = json.dumps({"html": PAYLOAD}, separators=(",", ":"))
    assert published in str(page.text_content("#timeline"))  # the published event, as JSON
    assert "<script>window.__pwned=1</script>" in str(page.text_content("#result"))
    failed = stack.api("POST", "/v1/workflows/markup_fails/runs?wait=20", json={"input": {}}).json()
    page.goto(f"{stack.url}/ui/runs/{failed['id']}?token={failed['stream_token']}")
    status_is(page, "failed")
    assert f"ValueError: {PAYLOAD}" in str(page.text_content("#result"))
    time.sleep(0.3)  # an onerror handler would have fired by now
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.evaluate("document.querySelectorAll('img, b').length") == 0
    assert page.evaluate("document.scripts.length") == 1  # the page's own module only
    assert page.evaluate("window.__violations") == []  # nothing was even attempted


def test_a_bad_token_shows_an_error_state(stack: Stack, page: Any) -> None:
    one = stack.api("POST", "/v1/workflows/markup/runs?wait=20", json={"input": {}}).json()
    two = stack.api("POST", "/v1/workflows/markup/runs?wait=20", json={"input": {}}).json()
    body, sig = one["stream_token"].split(".")
    cases = {
        f"{body}.{sig[:-4]}AAAA" if not sig.endswith("AAAA") else f"{body}.{sig[:-4]}BBBB":
            "token_invalid",
        two["stream_token"]: "token_wrong_run",
    }  # fmt: skip
    for token, code in cases.items():
        resp = page.goto(f"{stack.url}/ui/runs/{one['id']}?token={token}")
        assert resp.status == 401
        status_is(page, "error")
        assert page.text_content("#problem-code") == code
        assert page.is_visible("#problem") and not page.is_visible("#content")
    resp = page.goto(f"{stack.url}/ui/runs/{one['id']}")  # no token, and API keys are on
    assert resp.status == 401
    status_is(page, "error")
    assert page.text_content("#problem-code") == "unauthorized"


# The genx.js example of docs/viewer.md, as a web app on another origin would serve it (the run id and
# token come from the app's backend, which started the run with its API key: here, the URL).
WEB_APP = """<!doctype html>
<pre id="out"></pre>
<script type="module">
  import { followRun } from "GATEWAY/ui/genx.js";
  const [id, token] = location.hash.slice(1).split(",");
  const out = document.querySelector("#out");
  followRun(id, {
    baseUrl: "GATEWAY", token,
    onEvent: (e) => { if (e.type === "output") out.textContent += e.data; },
    onEnd: (e) => { window.ended = e.type; },
  });
</script>
"""


def test_a_web_app_on_another_origin_follows_a_run_with_genx_js(stack: Stack, page: Any) -> None:
    stack.serve_app(WEB_APP.replace("GATEWAY", stack.url))
    run = stack.api("POST", "/v1/workflows/markup/runs", json={"input": {"times": 5}}).json()
    page.goto(f"{stack.app_url}/#{run['id']},{run['stream_token']}")
    page.wait_for_function("() => window.ended", timeout=30_000)
    assert page.evaluate("window.ended") == "run.succeeded"
    assert page.text_content("#out") == "".join(stack.output_events(run["id"]))


def test_the_viewer_asks_for_the_input_a_run_waits_for_with_a_form_from_its_schema(
    stack: Stack, page: Any
) -> None:
    inp = {"sections": 3, "review_seconds": 300}
    run = stack.api("POST", "/v1/workflows/article/runs", json={"input": inp}).json()
    # The run's stream_token only reads: its form says so, and the run still waits.
    page.goto(f"{stack.url}/ui/runs/{run['id']}?token={run['stream_token']}")
    status_is(page, "waiting", timeout=60)
    page.wait_for_selector("#input-card:not([hidden])")
    assert "Approve the outline" in str(page.text_content("#input-prompt"))
    page.click("#input-send")
    page.wait_for_function("() => document.querySelector('#input-error').textContent !== ''")
    assert "scope answer" in str(page.text_content("#input-error"))
    assert stack.api("GET", f"/v1/runs/{run['id']}").json()["status"] == "waiting"

    # A reviewer's link: a token minted to answer.
    answer = stack.api("POST", f"/v1/runs/{run['id']}/tokens", json={"scope": "answer"}).json()
    page.goto(f"{stack.url}/ui/runs/{run['id']}?token={answer['token']}")
    page.wait_for_selector("#input-card:not([hidden])")
    assert page.get_attribute("#input-approve", "type") == "checkbox"
    assert page.is_checked("#input-approve")  # the model's default
    assert page.evaluate("document.querySelector('#input-headings').tagName") == "TEXTAREA"
    page.fill("#input-headings", "\n".join(f"H{i}" for i in range(13)))  # over the 12 allowed
    page.click("#input-send")
    page.wait_for_function("() => document.querySelector('#input-error').textContent !== ''")
    assert "headings" in str(page.text_content("#input-error"))  # the API's 422, shown
    page.fill("#input-headings", "Alpha\nBeta")
    page.click("#input-send")
    status_is(page, "succeeded", timeout=120)
    assert page.is_hidden("#input-card")
    done = stack.api("GET", f"/v1/runs/{run['id']}").json()
    assert done["output"]["outline"] == ["Alpha", "Beta"]
    assert "input received" in str(page.text_content("#timeline"))
