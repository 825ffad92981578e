"""Durable waits: a workflow that asks a person, sleeps, or waits for a child run holds nothing
while it waits but its state in Redis.

Each wait is a step: it takes a position among its siblings (a deterministic id) and its outcome
is journaled. When the outcome is not there yet, the wait *parks* the run: the body stops (a
:class:`Parked` is raised through it, which user code's ``except Exception`` does not catch),
and one script (lua.PARK) moves the run to ``waiting`` as its next attempt, with the wait's
events, and releases its lease: no host, no slot, no process holds it. What ends the wait
resumes the run (lua.RESUME: the outcome journaled, the run queued again) exactly once, whoever
tries: input posted to the API, the timer service (a sleep's end, an input's deadline, a check
on a child) or a child run's end. The resumed run replays its journal up to the wait, which now
returns its outcome: the steps before the wait do not run again and the wait is not asked twice.

Call waits from the workflow body. In a step, the step's code before the wait runs again when
the run resumes; in ``asyncio.gather`` with other branches, those stop with the park (nothing of
theirs is written) and run again, or replay, after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from genx_ray.flow._context import RunContext, current_run, current_scope
from genx_ray.model import (
    InputRequestedEvent,
    InputTimeout,
    JournalEntry,
    RunWaitingEvent,
    StepRef,
    UserError,
    canonical_hash,
    to_json,
)

M = TypeVar("M", bound=BaseModel)

# Shorter sleeps happen in place (journaled): parking and resuming costs more than they last.
PARK_MIN_SECONDS = 1.0
# A parent waiting for a child is checked this often by the timer service, in case the child
# ended in a way that did not tell it (failed by the supervisor, cancelled...).
CHILD_CHECK_SECONDS = 5.0


@dataclass
class Parked(BaseException):
    """Raised through a workflow body to park its run (not an error: a BaseException, so the
    body's ``except Exception`` lets it through)."""

    step: str
    kind: str  # input | sleep | child | batch
    events: list[Any] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    due: float | None = None  # when the timer service looks at it
    ready_if_journaled: bool = False  # a child's outcome may land while it parks

    def __str__(self) -> str:
        return f"parked on {self.step} ({self.kind})"


def _here(what: str) -> tuple[RunContext, str]:
    ctx, scope = current_run(), current_scope()
    if ctx is None or scope is None:
        raise UserError(f"{what} works inside a workflow run (there is none here)")
    return ctx, scope.next_step_id(what)


def input_id(run_id: str, step: str) -> str:
    """The id of the input a wait asks for: the same for the same run and step, unguessable
    beyond them."""
    return "inp_" + hashlib.sha256(f"{run_id}\n{step}".encode()).hexdigest()[:20]


async def wait_for_input(
    model: type[M],
    *,
    timeout: float | None = None,  # noqa: ASYNC109 - a deadline kept in Redis: the contract's name
    prompt: str | None = None,
) -> M:
    """Wait for a person (or a system) to post input fitting ``model`` to
    ``POST /v1/runs/{id}/input``; the run's status is ``waiting`` meanwhile, and it holds no
    host. Returns the validated model. Past ``timeout`` seconds raises :class:`InputTimeout`,
    which the workflow may catch (to fall back on a default, say).
    """
    ctx, step = _here("wait_for_input")
    schema = model.model_json_schema()
    recorded = ctx.recorded(step, "wait_for_input", canonical_hash(schema, prompt))
    if recorded is not None:
        if recorded.error is not None:
            raise InputTimeout(ctx.run_id, input_id(ctx.run_id, step), recorded.error["deadline"])
        try:
            return model.model_validate(recorded.value)
        except ValidationError as exc:  # checked against the schema already: a model's own rule
            raise UserError(
                f"wait_for_input: the input does not fit {model.__name__}: {exc}"
            ) from None
    deadline = None if timeout is None else time.time() + timeout
    ref = StepRef(id=step, name="wait_for_input")
    ident = input_id(ctx.run_id, step)
    fields = {
        "wait_kind": "input", "input_id": ident, "input_schema": _json(schema),
        "wait_prompt": prompt or "", "wait_deadline": "" if deadline is None else repr(deadline),
        "wait_hash": canonical_hash(schema, prompt),
    }  # fmt: skip
    events = [
        RunWaitingEvent(run_id=ctx.run_id, reason="input", until=deadline, step=ref),
        InputRequestedEvent(
            run_id=ctx.run_id, input_id=ident, input_schema=schema, prompt=prompt,
            deadline=deadline, step=ref,
        ),
    ]  # fmt: skip
    raise Parked(step, "input", events, fields, due=deadline)


async def sleep(seconds: float) -> None:
    """A durable timer: the run waits ``seconds`` holding no host (from a second on; shorter
    sleeps happen in place), survives the restart of every worker, and wakes within a second of
    its time. The end of the sleep is journaled: a restarted run does not sleep again."""
    await sleep_until(datetime.fromtimestamp(time.time() + max(0.0, seconds), UTC))


async def sleep_until(when: datetime) -> None:
    """:func:`sleep` until ``when`` (an aware datetime; a naive one is taken as UTC)."""
    ctx, step = _here("sleep")
    until = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    if ctx.recorded(step, "sleep", "") is not None:
        return
    left = until - time.time()
    if left < PARK_MIN_SECONDS:
        await asyncio.sleep(max(0.0, left))
        ctx.writer.queue((), ((step, JournalEntry("sleep", "", value=until).dumps()),))
        return
    ref = StepRef(id=step, name="sleep")
    event = RunWaitingEvent(run_id=ctx.run_id, reason="sleep", until=until, step=ref)
    raise Parked(step, "sleep", [event], {"wait_kind": "sleep", "wait_until": repr(until)}, until)


def _json(value: Any) -> str:
    import json

    return json.dumps(to_json(value), separators=(",", ":"))
