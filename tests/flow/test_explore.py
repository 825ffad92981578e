"""genx_ray.explore against real runs: runs made with genx_ray.start on the session's Redis, LLM
calls over HTTP to the simulator, frames compared with what Redis holds."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pytest
import redis
from helpers import execute
from llm.conftest import Sim
from matplotlib.figure import Figure

from genx_ray import RetryPolicy, StepError, component, explore, publish, start, workflow
from genx_ray.flow import Registry
from genx_ray.llm import AsyncOpenAI
from genx_ray.model import RunFailed, RunRestartedEvent, RunStatus, UserError
from genx_ray.store import RunStore
from genx_ray.store import keys as genx_keys

calls: Counter[str] = Counter()
gates: dict[str, threading.Event] = {}


@component(retry=RetryPolicy(max_attempts=3, initial_interval=0.02, jitter=0))
async def flaky(token: str) -> str:
    calls[token] += 1
    if calls[token] == 1:
        raise ValueError("fails the first time")
    return token


@component(cache_ttl=60)
async def lookup(token: str) -> int:
    await asyncio.sleep(0.01)
    return len(token)


@component
async def square(x: int) -> int:
    await asyncio.sleep(0.005)
    if x == 3:
        raise ValueError("three is not welcome")
    return x * x


@component
async def wait_for_gate(token: str) -> str:
    await asyncio.to_thread(gates[token].wait, 30)  # set by the test (or at the end of it)
    return token


@workflow(name="explore-steps")
async def steps_wf(token: str, n: int = 8) -> int:
    await flaky(token)
    first = await lookup(token)  # a miss: it runs...
    second = await lookup(token)  # ...and a hit
    squares = await square.map(list(range(n)), concurrency=4)
    return first + second + sum(s for s in squares if not isinstance(s, StepError))


@workflow(name="explore-gated")
async def gated(token: str) -> str:
    await lookup(token)
    return await wait_for_gate(token)


@workflow(name="explore-ok")
async def ok(x: int = 1) -> int:
    return x


@workflow(name="explore-boom")
async def boom() -> None:
    raise ValueError("boom")


@component
async def ask(question: str) -> str:
    response = await AsyncOpenAI().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": question}]
    )
    return str(response.choices[0].message.content)


@workflow(name="explore-llm")
async def asks(questions: list[str]) -> list[str]:
    answers = await ask.map(questions, concurrency=4)
    publish("answered", {"n": len(answers)})
    return [a for a in answers if isinstance(a, str)]


@pytest.fixture(scope="module")
def ex(redis_url: str) -> Iterator[explore.Explorer]:
    # The first run this process creates on a fresh Redis can be dropped from the run index
    # by the supervisor's first trim (RunStore.create writes the index before the record when
    # its script is not loaded yet): one run first, so the runs these tests list are indexed.
    assert start(ok, {"x": 0}).result(10) == 0
    with explore.Explorer(redis_url) as explorer:
        yield explorer


def _gate(token: str) -> threading.Event:
    gates[token] = threading.Event()
    return gates[token]


# -- runs ------------------------------------------------------------------------------------------


def test_runs_frame_filters_by_workflow_status_and_since(ex: explore.Explorer) -> None:
    first = start(ok, {"x": 1})
    first.result(10)
    time.sleep(0.01)
    since = datetime.now(UTC)
    second = start(ok, {"x": 2})
    second.result(10)
    failed = start(boom)
    with pytest.raises(RunFailed):
        failed.result(10)
    token = uuid.uuid4().hex
    gate = _gate(token)
    running = start(gated, {"token": token})
    try:
        deadline = time.monotonic() + 10
        while running.status != "running":
            assert time.monotonic() < deadline
            time.sleep(0.01)

        oks = ex.runs_frame(workflow="explore-ok")
        assert list(oks.columns) == explore.RUN_COLUMNS
        assert list(oks["run_id"][:2]) == [second.id, first.id]  # newest first
        assert set(oks["status"]) == {"succeeded"}
        assert (oks["finished_at"] >= oks["started_at"]).all()

        mine = {first.id, second.id, failed.id, running.id}
        after = ex.runs_frame(since=since)
        assert set(after["run_id"]) & mine == {second.id, failed.id, running.id}
        assert (after["created_at"] >= pd.Timestamp(since)).all()
        assert set(ex.runs_frame(since=timedelta(minutes=5))["run_id"]) >= mine
        assert set(ex.runs_frame(since=since.timestamp())["run_id"]) & mine == {
            second.id, failed.id, running.id,
        }  # fmt: skip

        (row,) = ex.runs_frame(workflow="explore-boom", status="failed").itertuples()
        assert row.run_id == failed.id and row.error == "boom" and row.error_type == "ValueError"
        (row,) = ex.runs_frame(status="running", since=since).itertuples()
        assert row.run_id == running.id and pd.isna(row.finished_at) and row.duration_s > 0
        both = ex.runs_frame(status=["failed", "running"], since=since)
        assert set(both["run_id"]) == {failed.id, running.id}
        assert len(explore.runs_frame(limit=2, redis_url=ex.redis_url)) == 2
        with pytest.raises(UserError, match="status"):
            ex.runs_frame(status="done")
    finally:
        gate.set()
    assert running.result(10) == token


def test_runs_are_listed_per_tenant(ex: explore.Explorer) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    theirs = start(ok, {"x": 3}, tenant=tenant)
    theirs.result(10)
    assert list(explore.runs_frame(tenant=tenant, redis_url=ex.redis_url)["run_id"]) == [theirs.id]
    assert theirs.id not in set(ex.runs_frame()["run_id"])


# -- one run's events and steps ----------------------------------------------------------------


def test_events_frame_rows_match_the_stream(ex: explore.Explorer, redis_url: str) -> None:
    handle = start(steps_wf, {"token": uuid.uuid4().hex})
    handle.result(10)
    frame = explore.events_frame(handle.id, redis_url=redis_url)
    raw = redis.Redis.from_url(redis_url, decode_responses=True).xrange(genx_keys.events(handle.id))
    assert list(frame["id"]) == [entry_id for entry_id, _ in raw]
    assert list(frame["type"]) == [fields["t"] for _, fields in raw]
    events = [e.event for e in handle.events(follow=False)]
    stamps = pd.Series([pd.Timestamp(e.ts, unit="s", tz="UTC") for e in events])
    assert (frame["ts"] - stamps).abs().max() < pd.Timedelta(microseconds=1)
    assert list(frame["step_id"].fillna("")) == [
        e.step.id if getattr(e, "step", None) else "" for e in events
    ]
    assert frame["elapsed_s"].iloc[0] == 0 and frame["elapsed_s"].is_monotonic_increasing
    progress = frame[frame["kind"] == "map"]
    assert progress["data"].iloc[-1] == {
        "step": "/3:square.map", "done": 8, "failed": 1, "total": 8,
        "rate": progress["data"].iloc[-1]["rate"], "eta": 0.0,
    }  # fmt: skip
    (retrying,) = frame[frame["type"] == "step.retrying"].itertuples()
    assert retrying.data["error"]["message"] == "fails the first time"
    assert frame["type"].iloc[-1] == "run.succeeded"


def test_steps_frame_has_a_row_per_attempt_with_retries_and_cache_hits(
    ex: explore.Explorer,
) -> None:
    handle = start(steps_wf, {"token": uuid.uuid4().hex})
    handle.result(10)
    steps = ex.steps_frame(handle.id)
    assert list(steps.columns) == explore.STEP_COLUMNS
    assert list(zip(steps["step_id"], steps["attempt"], steps["status"], strict=True)) == [
        ("/0:flaky", 1, "retried"),
        ("/0:flaky", 2, "succeeded"),
        ("/1:lookup", 1, "succeeded"),
        ("/2:lookup", 1, "succeeded"),
        ("/3:square.map", 1, "succeeded"),
        ("/3:square.map/3:square", 1, "failed"),  # a quiet map item: only its failure shows
    ]
    by_step = steps.groupby("step_id")["retries"].max().to_dict()
    assert by_step == {"/0:flaky": 1, "/1:lookup": 0, "/2:lookup": 0, "/3:square.map": 0,
                       "/3:square.map/3:square": 0}  # fmt: skip
    assert list(steps["cached"]) == [False, False, False, True, False, False]
    assert list(steps["kind"]) == ["step", "step", "step", "step", "map", "item"]
    retried, retry = steps.iloc[0], steps.iloc[1]
    assert retried.error_type == "ValueError" and retried.error == "fails the first time"
    assert retry.start >= retried.end + pd.Timedelta(seconds=0.015)  # after the backoff
    hit = steps.iloc[3]
    assert hit.duration_s == 0 and hit.start == hit.end
    item = steps.iloc[5]
    assert pd.isna(item.start) and item.parent == "/3:square.map"
    assert item.error == "three is not welcome"
    timed = steps[steps["start"].notna()]
    assert (timed["end"] >= timed["start"]).all() and timed["start"].is_monotonic_increasing
    # The whole-step durations agree with what the step events measured.
    (done,) = [e.event for e in handle.events(follow=False)
               if e.type == "step.completed" and e.event.step.id == "/3:square.map"]  # type: ignore[union-attr]  # fmt: skip
    map_row = steps[steps["step_id"] == "/3:square.map"].iloc[0]
    assert map_row.duration_s == pytest.approx(done.duration_ms / 1e3, abs=0.01)  # type: ignore[union-attr]
    assert set(steps["run_attempt"]) == {1}


def test_map_progress_frame_follows_the_map(ex: explore.Explorer) -> None:
    handle = start(steps_wf, {"token": uuid.uuid4().hex, "n": 40})
    handle.result(10)
    maps = ex.map_progress_frame(handle.id)
    assert list(maps.columns) == explore.MAP_COLUMNS
    assert set(maps["step_id"]) == {"/3:square.map"} and set(maps["total"]) == {40}
    assert maps["done"].is_monotonic_increasing and maps["done"].iloc[-1] == 40
    assert maps["failed"].iloc[-1] == 1 and maps["eta"].iloc[-1] == 0


def test_a_running_run_shows_its_open_attempt_then_a_cancelled_one(
    ex: explore.Explorer,
) -> None:
    token = uuid.uuid4().hex
    _gate(token)  # not opened before the run is cancelled
    handle = start(gated, {"token": token})
    deadline = time.monotonic() + 10
    while "/1:wait_for_gate" not in set(ex.steps_frame(handle.id)["step_id"]):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    steps = ex.steps_frame(handle.id)
    assert list(steps["status"]) == ["succeeded", "running"]
    assert pd.isna(steps["end"].iloc[1]) and pd.isna(steps["duration_s"].iloc[1])
    fig = ex.timeline(handle.id)
    assert len(fig.axes[0].patches) == 2 and "running (so far)" in fig.axes[0].get_title()

    handle.cancel()
    deadline = time.monotonic() + 10
    while not handle.status.terminal:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gates[token].set()  # the thread the cancelled step waited in
    steps = ex.steps_frame(handle.id)
    assert list(steps["status"]) == ["succeeded", "cancelled"]
    assert steps["end"].iloc[1] >= steps["start"].iloc[1]


@component
async def first(x: int) -> int:
    return x + 1


@component
async def second(x: int) -> int:
    calls["second"] += 1
    if calls["second"] == 1:
        await asyncio.Event().wait()  # the first attempt's host dies in here
    return x * 2


restartable = Registry()


@workflow(name="explore-restarted", registry=restartable)
async def restarted(x: int) -> int:
    return await second(await first(x))


async def test_a_restarted_run_shows_the_cut_off_attempt_and_the_replays(
    ex: explore.Explorer, redis: Any, runs: RunStore
) -> None:
    calls["second"] = 0
    run = await runs.create("explore-restarted", {"x": 1})
    host = asyncio.create_task(execute(redis, run.id, restartable))
    while calls["second"] == 0:  # noqa: ASYNC110 - polling a counter the step bumps
        await asyncio.sleep(0.005)
    host.cancel()  # the host dies; then what the supervisor does when its lease goes stale:
    with pytest.raises(asyncio.CancelledError):
        await host
    await runs.transition(
        run.id, RunStatus.QUEUED, allowed={RunStatus.RUNNING}, fields={"attempt": "2"},
        event=RunRestartedEvent(run_id=run.id, attempt=2, reason="heartbeat lost"),
    )  # fmt: skip
    assert await execute(redis, run.id, restartable) == RunStatus.SUCCEEDED

    steps = ex.steps_frame(run.id)
    rows = zip(
        steps["step_id"], steps["status"], steps["replayed"], steps["run_attempt"], strict=True
    )
    assert list(rows) == [
        ("/0:first", "succeeded", False, 1),
        ("/1:second", "interrupted", False, 1),  # ended by run.restarted
        ("/0:first", "succeeded", True, 2),  # from the journal: no attempt ran
        ("/1:second", "succeeded", False, 2),
    ]
    replay = steps.iloc[2]
    assert replay.start == replay.end
    fig = ex.timeline(run.id)
    assert len(fig.axes[0].patches) == 4 and len(fig.axes) == 1


def test_timeline_draws_a_bar_per_attempt_and_the_map_progress(ex: explore.Explorer) -> None:
    handle = start(steps_wf, {"token": uuid.uuid4().hex})
    handle.result(10)
    fig = explore.timeline(handle.id, redis_url=ex.redis_url)
    assert isinstance(fig, Figure)
    steps = ex.steps_frame(handle.id)
    gantt, progress = fig.axes[:2]
    assert len(gantt.patches) == steps["start"].notna().sum() == 5  # the quiet item has none
    assert [t.get_text() for t in gantt.get_yticklabels()] == [
        "0:flaky", "1:lookup", "2:lookup", "3:square.map",
    ]  # fmt: skip
    done, failed = progress.get_lines()  # the items done, and (dotted) the failed ones
    assert (done.get_ydata()[-1], failed.get_ydata()[-1]) == (8, 1)  # type: ignore[index]
    assert failed.get_linestyle() == ":" and failed.get_color() == done.get_color()
    png = fig._repr_png_()  # type: ignore[attr-defined]
    assert png.startswith(b"\x89PNG")


def test_timeline_of_a_run_without_steps(ex: explore.Explorer) -> None:
    handle = start(ok, {"x": 5})
    handle.result(10)
    fig = ex.timeline(handle.id)
    assert len(fig.axes) == 1 and not fig.axes[0].patches


def test_an_unknown_run_is_not_found(ex: explore.Explorer) -> None:
    from genx_ray.model import RunNotFound

    with pytest.raises(RunNotFound):
        ex.events_frame("run_00000000000000000000000000")
    with pytest.raises(RunNotFound):
        ex.timeline("run_00000000000000000000000000")


# -- LLM usage ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_sim() -> Iterator[Sim]:
    sim = Sim()
    yield sim
    sim.server.should_exit = True


def test_usage_frame_from_runs_that_made_llm_calls(
    ex: explore.Explorer, llm_sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm_sim.configure()
    monkeypatch.setenv("OPENAI_API_KEY", "sim-key")
    monkeypatch.setenv("OPENAI_BASE_URL", llm_sim.base_url)
    monkeypatch.delenv("GENX_LLM_LIMITS", raising=False)
    since = time.time()
    handles = [
        start(asks, {"questions": [f"q{i}-{r}" for i in range(n)]}) for r, n in enumerate((3, 2))
    ]
    for h in handles:
        h.result(30)
    assert llm_sim.stats()["served"] == 5

    per_run = ex.usage_frame(workflow="explore-llm", since=since)
    assert list(per_run["run_id"]) == [handles[1].id, handles[0].id]
    assert list(per_run["calls"]) == [2, 3]
    for h, row in zip(reversed(handles), per_run.itertuples(), strict=True):
        usage = h.get().usage
        assert usage is not None  # the run record: authoritative
        assert (row.prompt_tokens, row.completion_tokens, row.retries) == (
            usage["prompt_tokens"], usage["completion_tokens"], usage["retries"],
        )  # fmt: skip
        assert row.total_tokens == row.prompt_tokens + row.completion_tokens > 0
        assert row.cost_usd == pytest.approx(usage["cost_usd"]) and row.cost_usd > 0

    (wf,) = ex.usage_frame(workflow="explore-llm", since=since, by="workflow").itertuples()
    assert (wf.workflow, wf.runs, wf.calls) == ("explore-llm", 2, 5)
    assert wf.cost_usd == pytest.approx(per_run["cost_usd"].sum())
    everything = explore.usage_frame(since=since, by="workflow", redis_url=ex.redis_url)
    assert list(everything["workflow"]) == ["explore-llm"]  # runs without LLM calls are left out
    runs = ex.runs_frame(workflow="explore-llm", since=since)
    assert list(runs["llm_calls"]) == [2, 3]
    (model,) = ex.usage_frame(workflow="explore-llm", since=since, by="model").itertuples()
    assert (model.model, model.workflow, model.runs, model.calls) == (
        "gpt-4o-mini", "explore-llm", 2, 5,
    )  # fmt: skip
    assert model.cost_usd == pytest.approx(wf.cost_usd)
    with pytest.raises(UserError, match="'run', 'workflow' or 'model'"):
        ex.usage_frame(by="tenant")  # type: ignore[arg-type]


# -- watching, importing -----------------------------------------------------------------------


def test_watch_prints_the_progress_outside_a_notebook(
    ex: explore.Explorer, capsys: pytest.CaptureFixture[str]
) -> None:
    handle = start(steps_wf, {"token": uuid.uuid4().hex, "n": 12})
    run = explore.watch(handle, redis_url=ex.redis_url)
    assert run.status == "succeeded" and run.id == handle.id
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{handle.id}: succeeded"
    assert any(line.startswith("square.map [" + "#" * 30 + "] 12/12, 1 failed") for line in out)


def test_genx_ray_does_not_import_pandas_and_explore_says_how_to_install_it() -> None:
    code = "import sys, genx_ray; print(sorted({'pandas', 'matplotlib', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # Without pandas (a None in sys.modules makes its import fail, as if it were not installed):
    code = "import sys; sys.modules['pandas'] = None; import genx_ray.explore"
    failed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert failed.returncode == 1
    assert "ImportError: genx_ray.explore needs pandas" in failed.stderr
    assert ".venv/bin/pip install -e '.[notebook]'" in failed.stderr
