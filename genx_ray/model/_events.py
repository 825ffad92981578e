"""Run events: one typed union shared by the runtime, the gateway, the CLI and notebooks.

Each event is a small frozen pydantic model named ``...Event`` with a ``type`` literal;
:data:`Event` joins them in a discriminated union, and that union is the wire format (SSE
``data:``, NDJSON lines, the Redis stream entry). Every event has ``type``, ``run_id`` and ``ts``;
step events add ``step``. :data:`EVENT_TYPES` and :data:`TERMINAL_TYPES` are read off the union.
"""

from __future__ import annotations

import time
import traceback as tb
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, field_validator

from genx_ray.model._redaction import redact, redact_json


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
            # The last frames are the useful ones; a whole traceback bloats every replay. Masked
            # before the cut: a secret across it would leave its prefix in clear.
            trace = redact("".join(tb.format_exception(exc, limit=-6)))[-4000:]
        return cls(type=type(exc).__name__, message=redact(str(exc))[:2000], traceback=trace)

    @field_validator("message", "traceback")
    @classmethod
    def _no_secrets(cls, text: str | None) -> str | None:
        """An error's text never carries a secret (an API key or a token it quotes)."""
        return redact(text) if text else text


class MapProgress(BaseModel):
    """The ``data`` of a ``progress`` event of kind ``map``: how far a ``Component.map`` is."""

    model_config = ConfigDict(frozen=True)

    step: str  # the map's step id
    done: int  # items finished, failed ones included
    failed: int
    total: int
    rate: float  # items per second since the map started
    eta: float | None = None  # seconds left at that rate (0 once done; None before any item)
    # llm="batch": the round, its provider batches (ids), their status and request_counts
    batch: dict[str, Any] | None = None


class BaseEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    terminal: ClassVar[bool] = False  # the run's last event: a stream closes after it

    run_id: str
    ts: float = Field(default_factory=time.time)


class RunQueuedEvent(BaseEvent):
    type: Literal["run.queued"] = "run.queued"
    workflow: str
    attempt: int = 1
    # Why a queued run still waits, once a worker found it could not start it yet:
    # "max_running" (GENX_MAX_RUNNING reached), "concurrency_key" (its workflow's Concurrency
    # limit reached for its key). None on the first, when the run is queued.
    reason: str | None = None


class RunStartedEvent(BaseEvent):
    type: Literal["run.started"] = "run.started"
    workflow: str
    attempt: int = 1
    worker: str | None = None


class RunRestartedEvent(BaseEvent):
    """A new attempt of the run, after its previous one stopped without finishing."""

    type: Literal["run.restarted"] = "run.restarted"
    attempt: int
    reason: str


class RunScheduledEvent(BaseEvent):
    """The run starts later: at ``start_at`` (unix seconds) it is queued."""

    type: Literal["run.scheduled"] = "run.scheduled"
    workflow: str
    start_at: float


class RunWaitingEvent(BaseEvent):
    """The run parked itself: no host holds it until it is resumed."""

    type: Literal["run.waiting"] = "run.waiting"
    reason: Literal["input", "sleep", "child", "batch"]
    until: float | None = None  # the deadline or wake-up time, unix seconds
    step: StepRef | None = None


class RunResumedEvent(BaseEvent):
    """A parked run is queued again, as ``attempt``: it replays its journal up to the wait."""

    type: Literal["run.resumed"] = "run.resumed"
    attempt: int
    reason: str


class InputRequestedEvent(BaseEvent):
    """``wait_for_input``: the run waits for ``POST /v1/runs/{id}/input`` with this schema."""

    type: Literal["input.requested"] = "input.requested"
    input_id: str
    input_schema: dict[str, Any]
    prompt: str | None = None
    deadline: float | None = None  # unix seconds; past it the workflow gets InputTimeout
    step: StepRef | None = None


class InputReceivedEvent(BaseEvent):
    type: Literal["input.received"] = "input.received"
    input_id: str
    input: JsonValue = None
    step: StepRef | None = None


class ChildStartedEvent(BaseEvent):
    type: Literal["child.started"] = "child.started"
    child_id: str
    workflow: str
    step: StepRef | None = None


class ChildFinishedEvent(BaseEvent):
    type: Literal["child.finished"] = "child.finished"
    child_id: str
    status: str
    step: StepRef | None = None


class StepStartedEvent(BaseEvent):
    type: Literal["step.started"] = "step.started"
    step: StepRef


class StepRetryingEvent(BaseEvent):
    type: Literal["step.retrying"] = "step.retrying"
    step: StepRef
    delay: float
    error: ErrorInfo


class StepCompletedEvent(BaseEvent):
    type: Literal["step.completed"] = "step.completed"
    step: StepRef
    cached: bool = False
    replayed: bool = False  # the result came from the journal of an earlier attempt
    # The result came from the journal of the run this one reruns (POST /v1/runs/{id}/rerun):
    # the step ran in that run, not in this one.
    reused: bool = False
    duration_ms: float | None = None


class StepFailedEvent(BaseEvent):
    type: Literal["step.failed"] = "step.failed"
    step: StepRef
    error: ErrorInfo
    replayed: bool = False
    reused: bool = False  # the failure came from the journal of the run this one reruns


class ProgressEvent(BaseEvent):
    """What ``publish(kind, data)`` sends; genx-ray's own kinds: ``map`` (:class:`MapProgress`),
    ``llm.retry``, ``llm.fallback``, ``llm.usage``."""

    type: Literal["progress"] = "progress"
    kind: str
    data: JsonValue = None
    step: StepRef | None = None


class OutputEvent(BaseEvent):
    """One chunk of streamed output (e.g. LLM tokens) of a step."""

    type: Literal["output"] = "output"
    data: JsonValue
    step: StepRef | None = None


class RunSucceededEvent(BaseEvent):
    terminal = True
    type: Literal["run.succeeded"] = "run.succeeded"
    output: JsonValue = None


class RunFailedEvent(BaseEvent):
    terminal = True
    type: Literal["run.failed"] = "run.failed"
    error: ErrorInfo


class RunCancelledEvent(BaseEvent):
    terminal = True
    type: Literal["run.cancelled"] = "run.cancelled"
    reason: str | None = None


class EventsTruncatedEvent(BaseEvent):
    """Sent by the gateway, never stored: a reader resumed after ``after``, but the stream was
    trimmed (``GENX_STREAM_MAXLEN``) and what follows starts at ``first_available``; events in
    between are gone. The run object still has the run's status and output."""

    type: Literal["events.truncated"] = "events.truncated"
    after: str
    first_available: str
    trimmed: int = 0  # events trimmed from the stream's start in all: at most this many missed


Event = Annotated[
    RunQueuedEvent
    | RunScheduledEvent
    | RunStartedEvent
    | RunRestartedEvent
    | RunWaitingEvent
    | RunResumedEvent
    | InputRequestedEvent
    | InputReceivedEvent
    | ChildStartedEvent
    | ChildFinishedEvent
    | StepStartedEvent
    | StepRetryingEvent
    | StepCompletedEvent
    | StepFailedEvent
    | ProgressEvent
    | OutputEvent
    | RunSucceededEvent
    | RunFailedEvent
    | RunCancelledEvent
    | EventsTruncatedEvent,
    Field(discriminator="type"),
]

EVENT_MODELS: tuple[type[BaseEvent], ...] = get_args(get_args(Event)[0])
EVENT_TYPES: tuple[str, ...] = tuple(m.model_fields["type"].default for m in EVENT_MODELS)
TERMINAL_TYPES = frozenset(m.model_fields["type"].default for m in EVENT_MODELS if m.terminal)

_adapter: TypeAdapter[Event] = TypeAdapter(Event)


def dump_event(event: BaseModel) -> str:
    """Compact JSON: no spaces, no null fields, every known secret masked (whatever field it
    is in: published data, outputs, input received...)."""
    return redact_json(event.model_dump_json(exclude_none=True))


def load_event(data: str | bytes) -> Event:
    return _adapter.validate_json(data)


def parse_event(data: Any) -> Event:
    return _adapter.validate_python(data)


def is_terminal(event: BaseModel) -> bool:
    return getattr(event, "type", None) in TERMINAL_TYPES
