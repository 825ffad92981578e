"""The operator's loop from the command line, against real processes (a worker and a gateway):
a failed run's steps as a tree, a rerun from its failed step, runs listed by tag, and cancelling
the runs a filter chooses (a dry run first, and never without a yes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers import wait_up
from wf_fixtures import ran

from genx_ray.store import free_port

pytestmark = pytest.mark.slow

TESTS = os.path.dirname(os.path.dirname(__file__))
CLI = [sys.executable, "-m", "genx_ray.cli"]


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[dict[str, str]]:
    """A worker (inline hosts) and a gateway serving the test workflows; the environment the
    CLI talks to them with."""
    port = free_port()
    env = {
        **os.environ, "GENX_REDIS_URL": redis_url, "GENX_WORKFLOWS": "wf_fixtures",
        "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
        "GENX_API_URL": f"http://127.0.0.1:{port}",
    }  # fmt: skip
    env.pop("GENX_API_KEYS", None)
    procs = [
        subprocess.Popen([*CLI, "worker", "--hosts", "inline", "--drain-timeout", "1"], env=env),
        subprocess.Popen([*CLI, "gateway", "--port", str(port)], env=env),
    ]
    try:
        wait_up(f"http://127.0.0.1:{port}/healthz", procs[1])
        yield env
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def genx(env: dict[str, str], *args: str, stdin: str | None = None) -> Any:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60,
                          input=stdin)  # fmt: skip


def test_a_failed_run_is_shown_as_a_tree_and_rerun_from_its_failed_step(
    stack: dict[str, str],
) -> None:
    where = tempfile.mkdtemp(prefix="genx-cli-")
    files = {"log": os.path.join(where, "log"), "flag": os.path.join(where, "flag")}
    open(files["flag"], "w").close()
    inp = f'{{"url": "http://x", "log": "{files["log"]}", "flag": "{files["flag"]}"}}'
    failed = genx(stack, "run", "ingest", "--input", inp, "--tag", "customer:cli-acme")
    assert failed.returncode == 1, failed.stderr[-2000:]
    run_id = failed.stderr.split("run ", 1)[1].split()[0]
    assert "the enrichment provider is down" in failed.stderr

    tree = genx(stack, "runs", "steps", run_id)
    assert tree.returncode == 0, tree.stderr
    lines = tree.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("├─ fetch_page  succeeded  /0:fetch_page  1 attempt")
    assert lines[2].startswith("└─ enrich_page  failed  /2:enrich_page  1 attempt")
    assert lines[2].endswith("RuntimeError: the enrichment provider is down")

    os.remove(files["flag"])
    rerun = genx(stack, "runs", "rerun", run_id, "--from-step", "/2:enrich_page")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.strip() == '"stored: page of http://x, enriched"'
    assert f"(a rerun of {run_id})" in rerun.stderr
    assert ran(files["log"]) == {"fetch_page": 1, "parse_page": 1, "enrich_page": 2,
                                 "store_page": 1}  # fmt: skip
    new_id = rerun.stderr.split("run ", 1)[1].split()[0]
    tree = genx(stack, "runs", "steps", new_id).stdout.splitlines()
    assert [line.endswith("reused") for line in tree] == [True, True, False, False]

    listed = genx(stack, "runs", "ls", "--tag", "customer:cli-acme")
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [(r[0], r[2], r[5]) for r in rows] == [
        (new_id, "succeeded", "customer:cli-acme"), (run_id, "failed", "customer:cli-acme"),
    ]  # fmt: skip
    original = httpx.get(f"{stack['GENX_API_URL']}/v1/runs/{run_id}").json()
    assert original["status"] == "failed" and original["reruns"] == [new_id]


def test_cancel_by_filter_says_how_many_and_needs_a_yes(stack: dict[str, str]) -> None:
    api = stack["GENX_API_URL"]
    tagged = [
        httpx.post(f"{api}/v1/workflows/sleepy/runs",
                   json={"input": {"seconds": 60}, "tags": {"batch": "cli-1"}}).json()["id"]
        for _ in range(2)
    ]  # fmt: skip
    other = httpx.post(f"{api}/v1/workflows/sleepy/runs",
                       json={"input": {"seconds": 60}, "tags": {"batch": "cli-2"}}).json()["id"]  # fmt: skip
    dry = genx(stack, "runs", "cancel", "--tag", "batch:cli-1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "2 run(s) match, 2 not ended" in dry.stderr
    assert sorted(line.split("\t")[0] for line in dry.stdout.splitlines()) == sorted(tagged)
    refused = genx(stack, "runs", "cancel", "--tag", "batch:cli-1")  # no terminal, no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    for run_id in [*tagged, other]:
        assert httpx.get(f"{api}/v1/runs/{run_id}").json()["cancel_requested"] is False
    done = genx(stack, "runs", "cancel", "--tag", "batch:cli-1", "--yes")
    assert done.returncode == 0, done.stderr
    assert "2 run(s) cancelled or asked to stop" in done.stderr
    for run_id in tagged:
        assert httpx.get(f"{api}/v1/runs/{run_id}").json()["cancel_requested"] is True
    assert httpx.get(f"{api}/v1/runs/{other}").json()["cancel_requested"] is False
    assert genx(stack, "runs", "cancel", other).returncode == 0


def test_genx_run_priority_and_the_queued_runs_with_theirs(stack: dict[str, str]) -> None:
    """Three runs of a key with room for two: the third waits queued, its priority listed."""
    user = f"cli-{os.getpid()}"
    ids = []
    for _ in range(3):
        made = genx(stack, "run", "keyed", "--input", f'{{"user": "{user}", "hold": 4}}',
                    "--priority", "1", "--detach")  # fmt: skip
        assert made.returncode == 0, made.stderr[-2000:]
        ids.append(json.loads(made.stdout)["id"])
    assert json.loads(made.stdout)["priority"] == 1
    deadline = time.monotonic() + 20
    while True:
        listed = genx(stack, "runs", "ls", "--status", "queued")
        rows = [line.split("\t") for line in listed.stdout.splitlines()]
        mine = [r for r in rows if r[0] in ids]
        if len(mine) == 1 and mine[0][0] == ids[2]:  # the first two run
            break
        assert time.monotonic() < deadline, listed.stdout
        time.sleep(0.2)
    assert mine[0][2] == "queued" and mine[0][-1] == "1"  # the priority column
    bad = genx(stack, "run", "keyed", "--input", '{"user": "x"}', "--priority", "7", "--detach")
    assert bad.returncode != 0 and "priority" in bad.stderr
