"""The README's main command, end to end: the whole stack (Redis, LLM simulator, worker with Ray
run hosts, gateway), the onboarding example through the API, the report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest


@pytest.mark.timeout(300)
def test_genx_demo_runs_the_onboarding_example_on_the_whole_stack(redis_url: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "genx_ray.cli", "demo"],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["pages"] == 12 and len(report["crawled"]) == 12  # the whole sample site
    assert all("/site/" in url for url in report["crawled"])  # and nothing off-site
    assert report["enrichments"] == 240 and report["failed"] == 0
    assert report["facts"][0]["title"] == "Acme Robotics | Acme Robotics"
    # What a newcomer reads first: the simulator's answers are sentences of the pages.
    assert report["facts"][0]["summary"].startswith("Acme Robotics builds warehouse robots")
    assert report["summary"].startswith("Acme Robotics builds warehouse robots")
    err = proc.stderr
    assert '"phase": "enriching", "calls": 240' in err  # live status the whole way
    assert "enrich.map 240/240" in err  # the batch, once done (a bar only on a terminal)
    assert report["summary"].split(" ")[0] in err  # the brief streamed as it was written
    # The first impression, read from a file as a newcomer would: Ray's own notices are in the
    # stack's log, not here; the streamed brief ends its line; no JSON line is wrapped.
    assert "Token authentication" not in err and "authentication_token" not in err
    log = re.search(r"^the stack's log \(Redis, Ray, worker, gateway\): (\S+)$", err, re.M)
    assert log and os.path.exists(log[1])
    lines = err.splitlines()
    brief = [i for i, line in enumerate(lines) if line.startswith(report["summary"][:40])]
    assert brief and lines[brief[0]].rstrip().endswith(report["summary"][-20:].rstrip())
    for line in lines:
        kind, _, data = line.partition(" ")
        if kind in ("phase", "crawl", "llm.usage"):
            json.loads(data)  # one whole JSON value a line


@pytest.mark.timeout(300)
def test_genx_demo_article_asks_for_the_outline_review_and_says_how_to_answer(
    redis_url: str,
) -> None:
    """The article waits for a person to review its outline: the demo says how to answer (CLI,
    curl, or a line on stdin) and the run goes on with the headings sent."""
    proc = subprocess.run(
        [sys.executable, "-m", "genx_ray.cli", "demo", "--workflow", "article"],
        input='{"headings": ["Why it matters", "How to start"]}\n',
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    article = json.loads(proc.stdout)
    assert article["outline"] == ["Why it matters", "How to start"]
    assert [s["heading"] for s in article["sections"]] == article["outline"]
    err = proc.stderr
    assert "the run waits for input" in err and "Approve the outline" in err
    assert "genx runs input run_" in err and "/input -H 'Content-Type: application/json'" in err
    assert err.index("input.received") > err.index("the run waits for input")
