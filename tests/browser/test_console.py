"""The operators' console in a real browser: signing in (the key kept in the tab, sent as a header
only), finding runs with a filter, cancelling some after a confirmation, rerunning a failed run
from its failed step, schedules and the cluster, and hostile tags, step names and outputs shown
as text. It takes the screenshots docs/console.md shows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from typing import Any

import pytest
from helpers import wait_up
from wf_fixtures import ran

from browser.conftest import API_KEY, CLI, Stack, _stop
from browser.test_viewer import ARTIFACTS, status_is
from browser.wf_viewer import HOSTILE_STEP, PAYLOAD
from genx_ray.store import free_port

pytestmark = pytest.mark.slow

DOCS = os.path.join(os.path.dirname(ARTIFACTS), "docs")


def sign_in(stack: Stack, page: Any, key: str = API_KEY) -> None:
    page.goto(f"{stack.url}/ui/")
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector("#signin:not([hidden])")
    page.fill("#api-key", key)
    page.click("#sign-in")
    if key == API_KEY:
        page.wait_for_selector("#page-runs:not([hidden])")


def rows(page: Any) -> list[str]:
    return list(
        page.eval_on_selector_all("#runs tr[data-run-id]", "rs => rs.map(r => r.dataset.runId)")
    )


def wait_rows(page: Any, expected: set[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while set(rows(page)) != expected:
        assert time.monotonic() < deadline, (rows(page), expected)
        time.sleep(0.1)


def confirm(page: Any, says: str) -> None:
    page.wait_for_selector("#confirm:not([hidden])")
    assert says in str(page.text_content("#confirm-text")), page.text_content("#confirm-text")
    page.click("#confirm-yes")


def shoot(page: Any, name: str) -> None:
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    page.screenshot(path=path, full_page=True)
    shutil.copy(path, os.path.join(DOCS, name))


def test_signing_in_keeps_the_key_in_the_tab_and_sends_it_as_a_header_only(
    stack: Stack, page: Any
) -> None:
    seen: list[Any] = []
    page.on("request", lambda request: seen.append(request))
    sign_in(stack, page, "not-a-key")
    page.wait_for_function("() => document.querySelector('#signin-error').textContent !== ''")
    assert "unauthorized" in str(page.text_content("#signin-error"))
    assert page.evaluate("sessionStorage.length") == 0
    page.fill("#api-key", API_KEY)
    page.click("#sign-in")
    page.wait_for_selector("#page-runs:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('genx.apiKey')") == API_KEY
    page.reload()  # the tab keeps it: still signed in
    page.wait_for_selector("#page-runs:not([hidden])")
    api_calls = [r for r in seen if "/v1/" in r.url]
    assert api_calls and all(API_KEY not in r.url for r in seen)  # never in an address
    signed = [r for r in api_calls if r.headers.get("authorization") == f"Bearer {API_KEY}"]
    assert len(signed) >= 2
    assert page.evaluate("document.cookie") == ""
    assert page.context.cookies() == []
    assert API_KEY not in page.url
    page.click("#sign-out")
    page.wait_for_selector("#signin:not([hidden])")
    assert page.evaluate("sessionStorage.length") == 0
    assert page.evaluate("window.__violations") == []


def test_a_gateway_without_api_keys_opens_the_console(stack: Stack, page: Any) -> None:
    port = free_port()
    env = {k: v for k, v in stack.env.items() if k != "GENX_API_KEYS"}
    gateway = subprocess.Popen([*CLI, "gateway", "--port", str(port)], env=env)
    try:
        wait_up(f"http://127.0.0.1:{port}/healthz", gateway)
        page.goto(f"http://127.0.0.1:{port}/ui")  # redirected to /ui/
        page.wait_for_selector("#page-runs:not([hidden])")
        assert page.is_hidden("#signin") and "open gateway" in str(page.text_content("#who"))
        assert page.evaluate("sessionStorage.length") == 0
    finally:
        _stop(gateway)


def test_the_runs_page_filters_counts_and_cancels_after_a_confirmation(
    stack: Stack, page: Any
) -> None:
    batch = f"ui-{uuid.uuid4().hex[:6]}"
    tags = {"customer": "acme", "batch": batch}
    where = tempfile.mkdtemp(prefix="genx-console-")
    flag = os.path.join(where, "flag")
    open(flag, "w").close()
    ingest = {"url": "https://acme.example/products", "log": os.path.join(where, "log"),
              "flag": flag, "delay": 0.2}  # fmt: skip

    def start(workflow: str, inp: dict[str, Any], wait: bool = True) -> str:
        query = "?wait=20" if wait else ""
        resp = stack.api("POST", f"/v1/workflows/{workflow}/runs{query}",
                         json={"input": inp, "tags": tags})  # fmt: skip
        assert resp.status_code in (200, 202), resp.text
        return str(resp.json()["id"])

    made = [start("ingest", ingest), start("echo", {"text": "hello"}), start("ingest", ingest),
            start("echo", {"text": "again"})]  # fmt: skip
    sleepy = [start("sleepy", {"seconds": 60}, wait=False) for _ in range(3)]
    other = stack.api("POST", "/v1/workflows/sleepy/runs",
                      json={"input": {"seconds": 60}, "tags": {"batch": "else"}}).json()["id"]  # fmt: skip
    sign_in(stack, page)
    page.fill("#f-tag", f"batch:{batch}")
    page.click("#f-apply")
    wait_rows(page, set(made + sleepy))
    page.wait_for_function(
        "() => document.querySelector('#count-failed').textContent === 'failed 2'"
    )
    assert page.text_content("#count-succeeded") == "succeeded 2"
    row = page.locator(f'#runs tr[data-run-id="{made[1]}"]')
    assert "customer:acme" in str(row.text_content()) and "succeeded" in str(row.text_content())
    shoot(page, "console-runs.png")

    # Two of the sleepy runs, selected, cancelled after saying how many.
    for run_id in sleepy[:2]:
        page.check(f'#runs tr[data-run-id="{run_id}"] input[type=checkbox]')
    assert page.text_content("#selected") == "2 selected"
    page.click("#cancel-selected")
    page.wait_for_selector("#confirm:not([hidden])")
    page.click("#confirm-no")  # asked, and nothing happens on a no
    assert stack.api("GET", f"/v1/runs/{sleepy[0]}").json()["cancel_requested"] is False
    page.click("#cancel-selected")
    confirm(page, "Cancel 2 run(s), selected?")
    page.wait_for_function("() => !document.querySelector('#notice').hidden")
    assert "2 of 2 run(s) cancelled" in str(page.text_content("#notice"))
    for run_id in sleepy[:2]:
        assert stack.api("GET", f"/v1/runs/{run_id}").json()["cancel_requested"] is True
    assert stack.api("GET", f"/v1/runs/{sleepy[2]}").json()["cancel_requested"] is False

    # The rest by the filter: the status one, counted first.
    page.select_option("#f-status", "running")
    page.click("#f-apply")
    wait_rows(page, {sleepy[2]})
    page.click("#cancel-matching")
    confirm(page, "Cancel 1 run(s), matching the filter?")
    page.wait_for_function("() => document.querySelector('#notice').textContent.includes('1 of 1')")
    assert stack.api("GET", f"/v1/runs/{sleepy[2]}").json()["cancel_requested"] is True
    assert stack.api("GET", f"/v1/runs/{other}").json()["cancel_requested"] is False
    stack.api("POST", f"/v1/runs/{other}/cancel")
    assert page.evaluate("window.__violations") == []


def test_a_failed_run_is_rerun_from_its_failed_step_in_the_console(stack: Stack, page: Any) -> None:
    where = tempfile.mkdtemp(prefix="genx-console-")
    files = {"log": os.path.join(where, "log"), "flag": os.path.join(where, "flag")}
    open(files["flag"], "w").close()
    run = stack.api("POST", "/v1/workflows/ingest/runs?wait=20", json={
        "input": {"url": "https://acme.example/about", "delay": 0.4, **files},
        "tags": {"customer": "acme"}}).json()  # fmt: skip
    assert run["status"] == "failed"
    os.remove(files["flag"])
    sign_in(stack, page)
    page.goto(f"{stack.url}/ui/#/runs/{run['id']}")
    status_is(page, "failed")
    page.wait_for_selector("body[data-final=true]")
    page.wait_for_selector('#steps [data-step-id="/2:enrich_page"] button.rerun-from')
    failed_row = page.locator('#steps [data-step-id="/2:enrich_page"]')
    assert "RuntimeError: the enrichment provider is down" in str(failed_row.text_content())
    assert page.locator("#steps [data-step-id]").count() == 3
    page.click('#steps [data-step-id="/2:enrich_page"] button.rerun-from')
    confirm(page, "from step /2:enrich_page")
    page.wait_for_function("id => !location.hash.includes(id)", arg=run["id"])
    rerun_id = page.evaluate("location.hash").rsplit("/", 1)[1]
    status_is(page, "succeeded")
    page.wait_for_selector("body[data-final=true]")
    page.wait_for_function("() => document.querySelectorAll('#steps [data-step-id]').length === 4")
    flags = page.eval_on_selector_all(
        "#steps [data-step-id]",
        "rs => rs.map(r => [r.dataset.stepId, !!r.querySelector('.reused')])",
    )
    assert flags == [["/0:fetch_page", True], ["/1:parse_page", True],
                     ["/2:enrich_page", False], ["/3:store_page", False]]  # fmt: skip
    assert f"a rerun of {run['id']} from /2:enrich_page" in str(page.text_content("#run-links"))
    done = stack.api("GET", f"/v1/runs/{rerun_id}").json()
    assert done["rerun_of"] == run["id"] and done["output"].startswith("stored: page of")
    assert ran(files["log"]) == {"fetch_page": 1, "parse_page": 1, "enrich_page": 2,
                                 "store_page": 1}  # fmt: skip
    assert stack.api("GET", f"/v1/runs/{run['id']}").json()["status"] == "failed"  # untouched
    shoot(page, "console-run.png")
    # The whole run again, from its own page's button.
    page.click("#rerun")
    confirm(page, "from the start")
    page.wait_for_function("id => !location.hash.includes(id)", arg=rerun_id)
    status_is(page, "succeeded")
    assert ran(files["log"])["fetch_page"] == 2
    assert page.evaluate("window.__violations") == []


def test_hostile_tags_step_names_and_outputs_are_shown_as_text(stack: Stack, page: Any) -> None:
    tags = {"<b>k</b>": PAYLOAD}
    run = stack.api("POST", "/v1/workflows/hostile/runs?wait=20",
                    json={"input": {}, "tags": tags}).json()  # fmt: skip
    assert run["status"] == "succeeded", run
    sign_in(stack, page)
    page.select_option("#f-workflow", "hostile")
    page.click("#f-apply")
    page.wait_for_selector(f'#runs tr[data-run-id="{run["id"]}"]')
    tags_cell = page.locator(f'#runs tr[data-run-id="{run["id"]}"] .tags')
    assert tags_cell.text_content() == f"<b>k</b>:{PAYLOAD}"
    page.click(f'#runs tr[data-run-id="{run["id"]}"] a')
    status_is(page, "succeeded")
    page.wait_for_selector("body[data-final=true]")
    page.wait_for_selector("#steps [data-step-id]")
    assert page.text_content("#steps .step-label .what") == HOSTILE_STEP
    assert page.text_content("#result") == json.dumps(PAYLOAD)  # the output, as JSON text
    time.sleep(0.3)  # an onerror handler would have fired by now
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.evaluate("document.querySelectorAll('main img, main b, main script').length") == 0
    assert page.evaluate("window.__violations") == []


def test_schedules_and_the_cluster(stack: Stack, page: Any) -> None:
    sign_in(stack, page)
    page.click("#nav a[data-page=schedules]")
    page.wait_for_selector("#page-schedules:not([hidden])")
    page.select_option("#s-workflow", "echo")
    page.fill("#s-cron", "not a cron")
    page.click("#s-create")
    page.wait_for_function("() => document.querySelector('#s-error').textContent !== ''")
    assert "cron" in str(page.text_content("#s-error"))
    page.fill("#s-cron", "0 0 1 1 *")
    page.fill("#s-input", '{"text": "new year"}')
    page.click("#s-create")
    page.wait_for_selector("#schedules tr[data-schedule-id]")
    schedule_id = page.get_attribute("#schedules tr[data-schedule-id]", "data-schedule-id")
    row = f'#schedules tr[data-schedule-id="{schedule_id}"]'
    page.click(f"{row} button.pause")
    page.wait_for_selector(f"{row} button.resume")
    assert "paused" in str(page.locator(row).text_content())
    assert stack.api("GET", f"/v1/schedules/{schedule_id}").json()["paused"] is True
    page.click(f"{row} button.resume")
    page.wait_for_selector(f"{row} button.pause")
    assert stack.api("GET", f"/v1/schedules/{schedule_id}").json()["paused"] is False
    page.click(f"{row} button.delete")
    confirm(page, f"Delete schedule {schedule_id}")
    page.wait_for_selector(row, state="detached")
    assert stack.api("GET", f"/v1/schedules/{schedule_id}").status_code == 404

    page.click("#nav a[data-page=cluster]")
    page.wait_for_selector("#workers tr[data-worker]")
    worker = str(page.locator("#workers tr[data-worker]").first.text_content())
    assert "alive" in worker and "(inline)" in worker
    assert page.text_content("#queue-depth") not in ("", "-")
    assert page.evaluate("window.__violations") == []


def test_a_run_waiting_for_input_is_answered_from_its_console_page(stack: Stack, page: Any) -> None:
    run = stack.api("POST", "/v1/workflows/review/runs", json={"input": {"n": 1}}).json()
    sign_in(stack, page)
    page.goto(f"{stack.url}/ui/#/runs/{run['id']}")
    status_is(page, "waiting", timeout=30)
    page.wait_for_selector("#input-card:not([hidden])")
    assert page.text_content("#input-prompt") == "approve?"
    page.check("#input-approve")
    page.fill("#input-comment", "<i>fine</i>")
    page.click("#input-send")  # with the console's key, not a run token
    status_is(page, "succeeded", timeout=30)
    done = stack.api("GET", f"/v1/runs/{run['id']}").json()
    assert done["output"]["decision"] == {"approve": True, "comment": "<i>fine</i>"}
    assert page.evaluate("document.querySelectorAll('main i').length") == 0
    assert page.evaluate("window.__violations") == []
