"""The event union is the wire format: every member round-trips, and the lists read off it
(types, terminal types) are what the contract names."""

from __future__ import annotations

import json
from typing import get_args

import pytest
from pydantic import ValidationError

from genx_ray.model import events as ev

RID = "run_TEST"
STEP = ev.StepRef(id="/0:fetch", name="fetch", attempt=2)
ERR = ev.ErrorInfo(type="ValueError", message="bad", traceback="Traceback...")

# A full example of each event, by type: every member of the union must have one.
EXAMPLES: dict[str, ev.BaseEvent] = {
    e.type: e  # type: ignore[attr-defined]
    for e in (
        ev.RunQueuedEvent(run_id=RID, workflow="wf"),
        ev.RunStartedEvent(run_id=RID, workflow="wf", attempt=1, worker="w1"),
        ev.RunRestartedEvent(run_id=RID, attempt=2, reason="heartbeat lost"),
        ev.StepStartedEvent(run_id=RID, step=STEP),
        ev.StepRetryingEvent(run_id=RID, step=STEP, delay=0.5, error=ERR),
        ev.StepCompletedEvent(run_id=RID, step=STEP, cached=True, duration_ms=12.5),
        ev.StepFailedEvent(run_id=RID, step=STEP, error=ERR),
        ev.ProgressEvent(run_id=RID, kind="phase", data={"done": 3, "of": [1, 2]}),
        ev.OutputEvent(run_id=RID, data="tok", step=STEP),
        ev.RunSucceededEvent(run_id=RID, output={"report": "ok"}),
        ev.RunFailedEvent(run_id=RID, error=ERR),
        ev.RunCancelledEvent(run_id=RID, reason="user"),
        ev.RunScheduledEvent(run_id=RID, workflow="wf", start_at=1795689293.5),
        ev.RunWaitingEvent(run_id=RID, reason="input", until=1795689293.5, step=STEP),
        ev.RunResumedEvent(run_id=RID, attempt=3, reason="input"),
        ev.InputRequestedEvent(
            run_id=RID,
            input_id="inp_1",
            input_schema={"type": "object"},
            prompt="ok?",
            deadline=1795689293.5,
            step=STEP,
        ),
        ev.InputReceivedEvent(run_id=RID, input_id="inp_1", input={"ok": True}, step=STEP),
        ev.ChildStartedEvent(run_id=RID, child_id="run_CHILD", workflow="wf", step=STEP),
        ev.ChildFinishedEvent(run_id=RID, child_id="run_CHILD", status="succeeded", step=STEP),
        ev.EventsTruncatedEvent(run_id=RID, after="1-0", first_available="9-0"),
    )
}
# What docs/api.md names, at least.
CONTRACT_TYPES = {
    "run.queued", "run.started", "run.restarted", "step.started", "step.retrying",
    "step.completed", "step.failed", "progress", "output", "run.succeeded", "run.failed",
    "run.cancelled",
}  # fmt: skip


def test_the_union_has_every_contract_type_and_an_example_of_each_member() -> None:
    members = get_args(get_args(ev.Event)[0])
    assert members == ev.EVENT_MODELS
    assert set(ev.EVENT_TYPES) == {m.model_fields["type"].default for m in members}
    assert set(ev.EVENT_TYPES) >= CONTRACT_TYPES
    assert set(EXAMPLES) == set(ev.EVENT_TYPES)
    assert all(m.__name__.endswith("Event") for m in members)


@pytest.mark.parametrize("event", EXAMPLES.values(), ids=lambda e: e.type)  # type: ignore[attr-defined]
def test_json_round_trip(event: ev.BaseEvent) -> None:
    wire = ev.dump_event(event)
    data = json.loads(wire)
    assert {"type", "run_id", "ts"} <= data.keys()
    assert " " not in wire.replace("heartbeat lost", "")  # compact
    assert "null" not in wire  # unset fields are left out
    assert ev.load_event(wire) == event


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(ValidationError):
        ev.load_event('{"type":"run.exploded","run_id":"r","ts":1}')


def test_terminal_types() -> None:
    assert {"run.succeeded", "run.failed", "run.cancelled"} == ev.TERMINAL_TYPES
    assert {t for t, e in EXAMPLES.items() if ev.is_terminal(e)} == ev.TERMINAL_TYPES


def test_map_progress_is_a_typed_payload() -> None:
    data = ev.MapProgress(step="/1:f.map", done=3, failed=1, total=10, rate=2.5, eta=2.8)
    event = ev.ProgressEvent(run_id=RID, kind="map", data=data.model_dump())
    assert ev.MapProgress.model_validate(ev.load_event(ev.dump_event(event)).data) == data  # type: ignore[union-attr]
