"""Run events: one typed union shared by the runtime, the gateway, the CLI and notebooks.

Each event is a small frozen pydantic model with a ``type`` literal; :data:`Event` joins them in a
discriminated union, and that union is the wire format (SSE ``data:``, NDJSON lines, the Redis
stream entry). Every event has ``type``, ``run_id`` and ``ts``; step events add ``step``.
"""

from __future__ import annotations

import time
import traceback as tb
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter


class StepRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    attempt: int = 1


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: str
    message: str
    traceback: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException, *, with_traceback: bool = True) -> ErrorInfo:
        trace = None
        if with_traceback and exc.__traceback__ is not None:
            # The last frames are the useful ones; a whole traceback bloats every replay.
            trace = "".join(tb.format_exception(exc, limit=-6))[-4000:]
        return cls(type=type(exc).__name__, message=str(exc)[:2000], traceback=trace)


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    run_id: str
    ts: float = Field(default_factory=time.time)


class RunQueued(_Event):
    type: Literal["run.queued"] = "run.queued"
    workflow: str
    attempt: int = 1


class RunStarted(_Event):
    type: Literal["run.started"] = "run.started"
    workflow: str
    attempt: int = 1
    worker: str | None = None


class RunRestarted(_Event):
    """A new attempt of the run, after its previous one stopped without finishing."""

    type: Literal["run.restarted"] = "run.restarted"
    attempt: int
    reason: str


class StepStarted(_Event):
    type: Literal["step.started"] = "step.started"
    step: StepRef


class StepRetrying(_Event):
    type: Literal["step.retrying"] = "step.retrying"
    step: StepRef
    delay: float
    error: ErrorInfo


class StepCompleted(_Event):
    type: Literal["step.completed"] = "step.completed"
    step: StepRef
    cached: bool = False
    replayed: bool = False  # the result came from the journal of an earlier attempt
    duration_ms: float | None = None


class StepFailed(_Event):
    type: Literal["step.failed"] = "step.failed"
    step: StepRef
    error: ErrorInfo
    replayed: bool = False


class Progress(_Event):
    type: Literal["progress"] = "progress"
    kind: str
    data: JsonValue = None
    step: StepRef | None = None


class Output(_Event):
    """One chunk of streamed output (e.g. LLM tokens) of a step."""

    type: Literal["output"] = "output"
    data: JsonValue
    step: StepRef | None = None


class RunSucceeded(_Event):
    type: Literal["run.succeeded"] = "run.succeeded"
    output: JsonValue = None


class RunFailed(_Event):
    type: Literal["run.failed"] = "run.failed"
    error: ErrorInfo


class RunCancelled(_Event):
    type: Literal["run.cancelled"] = "run.cancelled"
    reason: str | None = None


Event = Annotated[
    RunQueued
    | RunStarted
    | RunRestarted
    | StepStarted
    | StepRetrying
    | StepCompleted
    | StepFailed
    | Progress
    | Output
    | RunSucceeded
    | RunFailed
    | RunCancelled,
    Field(discriminator="type"),
]

TERMINAL_TYPES = frozenset({"run.succeeded", "run.failed", "run.cancelled"})
EVENT_TYPES = (
    "run.queued", "run.started", "run.restarted", "step.started", "step.retrying",
    "step.completed", "step.failed", "progress", "output", "run.succeeded", "run.failed",
    "run.cancelled",
)  # fmt: skip

_adapter: TypeAdapter[Event] = TypeAdapter(Event)


def dumps(event: BaseModel) -> str:
    """Compact JSON: no spaces, no null fields."""
    return event.model_dump_json(exclude_none=True)


def loads(data: str | bytes) -> Event:
    return _adapter.validate_json(data)


def parse(data: Any) -> Event:
    return _adapter.validate_python(data)


def is_terminal(event: BaseModel) -> bool:
    return getattr(event, "type", None) in TERMINAL_TYPES
