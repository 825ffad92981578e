"""A run as its record in Redis says it is: :class:`Run` (what the API returns, what a host
resumes from) and the durable wait it may be in (:class:`Wait`), read from the record's hash.
The record is written only by :class:`genx_ray.store._runs.RunStore`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field, JsonValue

from genx_ray.model._errors import InputInvalid, UserError
from genx_ray.model._events import ErrorInfo
from genx_ray.model._status import RunStatus

__all__ = [
    "DEFAULT_PRIORITY",
    "DEFAULT_TENANT",
    "MAX_RERUN_LINKS",
    "MAX_TAGS",
    "MAX_TAG_KEY",
    "MAX_TAG_VALUE",
    "Run",
    "Wait",
    "check_priority",
    "check_tags",
    "parse_tag",
]  # fmt: skip

DEFAULT_TENANT = "default"  # the one tenant of a gateway without API keys
MAX_TAGS = 16  # tags of one run
DEFAULT_PRIORITY = 3  # a run's priority unless told: 1 most urgent .. 5 least
MAX_TAG_KEY = 64  # characters
MAX_TAG_VALUE = 256
MAX_RERUN_LINKS = 100  # the newest reruns a run lists (``reruns``)


class Wait(BaseModel):
    """What a ``waiting`` run waits for."""

    kind: str  # input | sleep | child | batch
    step: str
    input_id: str | None = None
    input_schema: dict[str, Any] | None = None
    prompt: str | None = None
    deadline: datetime | None = None  # input: when the workflow gets InputTimeout
    until: datetime | None = None  # sleep: when it wakes up
    child_id: str | None = None

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Wait | None:
        if "wait_kind" not in h:
            return None

        def ts(name: str) -> datetime | None:
            return datetime.fromtimestamp(float(h[name]), UTC) if h.get(name) else None

        return cls(
            kind=h["wait_kind"], step=h.get("wait_step", ""), input_id=h.get("input_id"),
            input_schema=json.loads(h["input_schema"]) if h.get("input_schema") else None,
            prompt=h.get("wait_prompt") or None, deadline=ts("wait_deadline"),
            until=ts("wait_until"), child_id=h.get("wait_child"),
        )  # fmt: skip


class Run(BaseModel):
    """A run as the API shows it."""

    id: str
    workflow: str
    status: RunStatus
    input: JsonValue = None
    output: JsonValue = None
    error: ErrorInfo | None = None
    attempt: int = 1
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    tenant: str = DEFAULT_TENANT
    cancel_requested: bool = False
    # LLM usage of the run (genx_ray.llm): calls, prompt_tokens, completion_tokens, retries,
    # cost_usd (an estimate from public prices); None before any call. And the same by model
    # (calls, prompt_tokens, completion_tokens, cost_usd).
    usage: dict[str, float] | None = None
    usage_by_model: dict[str, dict[str, float]] | None = None
    # A child run: the run that started it. A delayed run: when it starts. A run a schedule
    # started: the schedule.
    parent_id: str | None = None
    start_at: datetime | None = None
    schedule_id: str | None = None
    # A waiting run: what it waits for (the input it asks for, until when...).
    waiting: Wait | None = None
    # The OpenTelemetry trace every attempt of the run joins (None with tracing off).
    trace_id: str | None = None
    # What the caller tagged it with at start (a child run inherits its parent's), searchable:
    # GET /v1/runs?tag=key:value.
    tags: dict[str, str] = Field(default_factory=dict)
    # 1 (most urgent) .. 5: among runs waiting to start, a more urgent one starts first.
    priority: int = DEFAULT_PRIORITY
    # A rerun: the run it reruns, and the step it reran from (None: from the start). A run that
    # was rerun: its reruns, oldest first (the newest MAX_RERUN_LINKS).
    rerun_of: str | None = None
    rerun_from_step: str | None = None
    reruns: list[str] = Field(default_factory=list)
    # Not shown by the API: where the run was started, and where its outcome goes in its parent.
    origin: str | None = Field(default=None, exclude=True)
    parent_step: str | None = Field(default=None, exclude=True)
    # The W3C context its attempts' spans are children of (genx_ray.observe._tracing).
    traceparent: str | None = Field(default=None, exclude=True)

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Run:
        def ts(name: str) -> datetime | None:
            return datetime.fromtimestamp(float(h[name]), UTC) if h.get(name) else None

        return cls(
            id=h["id"],
            workflow=h["workflow"],
            status=RunStatus(h["status"]),
            input=json.loads(h.get("input") or "null"),
            output=json.loads(h["output"]) if "output" in h else None,
            error=ErrorInfo.model_validate_json(h["error"]) if h.get("error") else None,
            attempt=int(h.get("attempt", "1")),
            created_at=ts("created_at") or datetime.now(UTC),
            started_at=ts("started_at"),
            finished_at=ts("finished_at"),
            tenant=h.get("tenant", DEFAULT_TENANT),
            cancel_requested=h.get("cancel_requested") == "1",
            usage=_usage(h),
            usage_by_model=_usage_by_model(h),
            parent_id=h.get("parent_id") or None,
            start_at=ts("start_at"),
            schedule_id=h.get("schedule_id") or None,
            waiting=Wait.from_hash(h),
            origin=h.get("origin") or None,
            parent_step=h.get("parent_step") or None,
            trace_id=trace_id_of(h.get("traceparent")),
            tags=json.loads(h["tags"]) if h.get("tags") else {},
            priority=int(h.get("priority") or DEFAULT_PRIORITY),
            rerun_of=h.get("rerun_of") or None,
            rerun_from_step=h.get("rerun_from_step") or None,
            reruns=h["reruns"].split() if h.get("reruns") else [],
            traceparent=h.get("traceparent") or None,
        )


def _usage(h: dict[str, str]) -> dict[str, float] | None:
    if "usage_calls" not in h:
        return None
    usage: dict[str, float] = {
        name: int(h.get(f"usage_{name}", "0"))
        for name in ("calls", "prompt_tokens", "completion_tokens", "retries")
    }
    usage["cost_usd"] = int(h.get("usage_cost_nanos", "0")) / 1e9
    if "usage_batch_calls" in h:  # calls answered through the provider's Batch API
        usage["batch_calls"] = int(h["usage_batch_calls"])
    return usage


def _usage_by_model(h: dict[str, str]) -> dict[str, dict[str, float]] | None:
    out: dict[str, dict[str, float]] = {}
    for field, value in h.items():
        if field.startswith("usage_m:"):
            model, _, counter = field[len("usage_m:") :].rpartition(":")
            if counter == "cost_nanos":
                out.setdefault(model, {})["cost_usd"] = int(value) / 1e9
            else:
                out.setdefault(model, {})[counter] = int(value)
    return out or None


def trace_id_of(value: str | None) -> str | None:
    """The trace id (32 hex digits) of a ``traceparent``, or None."""
    if not value:
        return None
    parts = value.split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    return parts[1]


def check_priority(priority: Any) -> int:
    """``priority`` if it is one (an integer 1..5), :data:`DEFAULT_PRIORITY` for None, else
    :class:`InputInvalid` naming the field."""
    if priority is None:
        return DEFAULT_PRIORITY
    if isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= 5:
        raise InputInvalid.field("priority", "must be an integer from 1 (most urgent) to 5")
    return priority


def check_tags(tags: Any) -> dict[str, str]:
    """``tags`` if they are valid run tags: a JSON object of at most :data:`MAX_TAGS` string
    values (at most :data:`MAX_TAG_VALUE` characters), under keys of 1 to :data:`MAX_TAG_KEY`
    characters without ``:`` (which separates key and value in a filter, ``tag=key:value``) or
    control characters. Else :class:`InputInvalid` naming the field."""
    if tags is None:
        return {}
    if not isinstance(tags, dict):
        raise InputInvalid.field("tags", 'must be an object of strings: {"customer": "acme"}')
    if len(tags) > MAX_TAGS:
        raise InputInvalid.field("tags", f"at most {MAX_TAGS} tags, not {len(tags)}")
    for key, value in tags.items():
        if not 1 <= len(key) <= MAX_TAG_KEY or ":" in key or not key.isprintable():
            raise InputInvalid.field(
                f"tags.{key}"[:80],
                f"a key has 1 to {MAX_TAG_KEY} printable characters and no ':'",
            )
        if not isinstance(value, str) or len(value) > MAX_TAG_VALUE:
            raise InputInvalid.field(
                f"tags.{key}", f"a value is a string of at most {MAX_TAG_VALUE} characters"
            )
    return dict(tags)


def parse_tag(text: str) -> tuple[str, str]:
    """A tag filter ``key:value`` as (key, value); :class:`UserError` if it is not one."""
    key, sep, value = text.partition(":")
    if not sep or not key or len(key) > MAX_TAG_KEY or len(value) > MAX_TAG_VALUE:
        raise UserError(f"tag filter {text[:80]!r}: expected key:value (e.g. customer:acme)")
    return key, value
