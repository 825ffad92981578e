"""Real `genx gateway` x2 and `genx worker` processes: resumable streams across gateways, the CLI."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from api.conftest import sse
from helpers import wait_up

from genx_ray.store import free_port

TESTS = os.path.dirname(os.path.dirname(__file__))


def _env(redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GENX_REDIS_URL=redis_url,
        GENX_WORKFLOWS="wf_fixtures",
        PYTHONPATH=os.pathsep.join(filter(None, [TESTS, env.get("PYTHONPATH")])),
        **extra,
    )
    return env


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[tuple[list[str], list[subprocess.Popen[bytes]]]]:
    env = _env(redis_url)
    cli = [sys.executable, "-m", "genx_ray.cli"]
    ports = [free_port(), free_port()]
    gateways = [subprocess.Popen([*cli, "gateway", "--port", str(p)], env=env) for p in ports]
    worker = subprocess.Popen([*cli, "worker", "--drain-timeout", "2"], env=env)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for url, proc in zip(urls, gateways, strict=True):
            wait_up(f"{url}/healthz", proc)
        yield urls, [*gateways, worker]
    finally:
        for proc in (*gateways, worker):
            proc.send_signal(signal.SIGTERM)
        for proc in (*gateways, worker):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_resume_after_random_disconnects_across_gateways_equals_full_replay(
    stack: tuple[list[str], list[subprocess.Popen[bytes]]],
) -> None:
    urls, _ = stack
    rng = random.Random(7)
    run = httpx.post(
        f"{urls[0]}/v1/workflows/ticker/runs", json={"input": {"n": 120, "delay": 0.01}}
    ).json()
    seen: list[str] = []
    reconnects = 0
    while not seen or not _terminal(seen[-1]):
        url = urls[reconnects % 2]  # every reconnect goes to the other gateway
        headers = {"Last-Event-ID": seen[-1].split(" ")[0]} if seen else {}
        cut = rng.randint(1, 40)
        with httpx.stream(
            "GET", f"{url}/v1/runs/{run['id']}/events", headers=headers, timeout=30
        ) as resp:
            assert resp.status_code == 200
            frame: dict[str, str] = {}
            for line in resp.iter_lines():  # drop the connection after `cut` events
                if line.startswith(("id:", "event:")):
                    field, _, value = line.partition(":")
                    frame[field] = value.strip()
                elif not line and frame:
                    seen.append(f"{frame['id']} {frame['event']}")
                    frame = {}
                    cut -= 1
                    if cut == 0 or _terminal(seen[-1]):
                        break
        reconnects += 1
    full = sse(httpx.get(f"{urls[1]}/v1/runs/{run['id']}/events", timeout=30).text)
    assert seen == [f"{f['id']} {f['event']}" for f in full]  # id for id: none lost, none repeated
    assert reconnects >= 5
    assert [f["event"] for f in full].count("progress") == 120


def _terminal(line: str) -> bool:
    return line.split(" ")[1] in ("run.succeeded", "run.failed", "run.cancelled")


def test_sync_wait_through_a_real_gateway(
    stack: tuple[list[str], list[subprocess.Popen[bytes]]],
) -> None:
    urls, _ = stack
    resp = httpx.post(
        f"{urls[1]}/v1/workflows/echo/runs?wait=20", json={"input": {"text": "ok"}}, timeout=30
    )
    assert resp.status_code == 200 and resp.json()["output"] == "OK"


def test_the_cli_follows_a_run(
    stack: tuple[list[str], list[subprocess.Popen[bytes]]], redis_url: str
) -> None:
    urls, _ = stack
    env = _env(redis_url, GENX_API_URL=urls[1])
    cli = [sys.executable, "-m", "genx_ray.cli"]
    done = subprocess.run([*cli, "run", "ticker", "--input", '{"n": 5}'], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == 10
    assert done.stderr.count("tick") == 5 and "run run_" in done.stderr

    detached = subprocess.run([*cli, "run", "echo", "--input", '{"text": "d"}', "--detach"],
                              env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    run = json.loads(detached.stdout)
    assert run["status"] == "queued"
    tail = subprocess.run([*cli, "runs", "tail", run["id"]], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert [line.split(" ")[1] for line in tail.stdout.splitlines()] == [
        "run.queued", "run.started", "step.started", "step.completed", "run.succeeded",
    ]  # fmt: skip
    ls = subprocess.run([*cli, "runs", "ls", "--workflow", "echo"], env=env, capture_output=True,
                        text=True, timeout=60)  # fmt: skip
    assert run["id"] in ls.stdout

    bad = subprocess.run([*cli, "run", "nope"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "workflow_not_found" in bad.stderr


def test_the_cli_and_the_client_add_and_list_schedules_page_after_page(
    stack: tuple[list[str], list[subprocess.Popen[bytes]]], redis_url: str
) -> None:
    from genx_ray.client import Client

    urls, _ = stack
    env = _env(redis_url, GENX_API_URL=urls[0])
    cli = [sys.executable, "-m", "genx_ray.cli", "schedules"]
    made = []
    for overlap in ("skip", "allow", "allow"):
        added = subprocess.run([*cli, "add", "echo", "--cron", "0 9 * * *", "--input",
                                '{"text": "s"}', "--overlap", overlap], env=env,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert added.returncode == 0, added.stderr
        schedule = json.loads(added.stdout)
        assert schedule["overlap"] == overlap
        made.append(schedule["id"])
    listed = [s["id"] for s in Client(urls[1]).schedules(page_size=2)]  # two pages at least
    assert [i for i in listed if i in made] == made
    ls = subprocess.run([*cli, "ls"], env=env, capture_output=True, text=True, timeout=60)
    assert all(i in ls.stdout for i in made)
    for schedule_id in made:
        subprocess.run([*cli, "rm", schedule_id], env=env, check=True, timeout=60)


def test_gateway_processes_never_load_ray(
    stack: tuple[list[str], list[subprocess.Popen[bytes]]],
) -> None:
    _, procs = stack
    for gw in procs[:2]:
        with open(f"/proc/{gw.pid}/maps") as maps:
            assert "_raylet" not in maps.read()
