from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from genx_ray import events as ev
from genx_ray.streams import EventStore

RID = "run_TEST"
STEP = ev.StepRef(id="/0:fetch", name="fetch", attempt=2)
ERR = ev.ErrorInfo(type="ValueError", message="bad", traceback="Traceback...")

ONE_OF_EACH: list[ev._Event] = [
    ev.RunQueued(run_id=RID, workflow="wf"),
    ev.RunStarted(run_id=RID, workflow="wf", attempt=1, worker="w1"),
    ev.RunRestarted(run_id=RID, attempt=2, reason="heartbeat lost"),
    ev.StepStarted(run_id=RID, step=STEP),
    ev.StepRetrying(run_id=RID, step=STEP, delay=0.5, error=ERR),
    ev.StepCompleted(run_id=RID, step=STEP, cached=True, duration_ms=12.5),
    ev.StepFailed(run_id=RID, step=STEP, error=ERR),
    ev.Progress(run_id=RID, kind="phase", data={"done": 3, "of": [1, 2]}),
    ev.Output(run_id=RID, data="tok", step=STEP),
    ev.RunSucceeded(run_id=RID, output={"report": "ok"}),
    ev.RunFailed(run_id=RID, error=ERR),
    ev.RunCancelled(run_id=RID, reason="user"),
]


def test_every_contract_type_has_a_model() -> None:
    assert sorted(e.type for e in ONE_OF_EACH) == sorted(ev.EVENT_TYPES)  # type: ignore[attr-defined]


@pytest.mark.parametrize("event", ONE_OF_EACH, ids=lambda e: e.type)
def test_json_round_trip(event: ev._Event) -> None:
    wire = ev.dumps(event)
    data = json.loads(wire)
    assert {"type", "run_id", "ts"} <= data.keys()
    assert " " not in wire.replace("heartbeat lost", "")  # compact
    assert "null" not in wire  # unset fields are left out
    assert ev.loads(wire) == event


async def test_stream_round_trip_every_type(events: EventStore) -> None:
    run_id = "run_roundtrip"
    ids = await events.append(run_id, *ONE_OF_EACH)
    assert len(ids) == len(ONE_OF_EACH) and ids == sorted(
        ids, key=lambda i: tuple(map(int, i.split("-")))
    )
    stored = await events.read(run_id)
    assert [s.id for s in stored] == ids
    assert [s.event for s in stored] == ONE_OF_EACH


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(ValidationError):
        ev.loads('{"type":"run.exploded","run_id":"r","ts":1}')


def test_terminal_types() -> None:
    assert {e.type for e in ONE_OF_EACH if ev.is_terminal(e)} == {  # type: ignore[attr-defined]
        "run.succeeded",
        "run.failed",
        "run.cancelled",
    }
