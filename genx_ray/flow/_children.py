"""Child runs: a workflow starting another registered workflow as a run of its own.

``await research.run_child(topic=...)`` starts ``research`` as a run (its own id, stream and
record, ``parent_id`` pointing back) and waits for its output; ``await research.start_child(...)``
returns a :class:`ChildRun` at once, to await later (``await child.result()``) or never. Both
read as calling the workflow, which is what they do, in a run of its own.

Starting is a step: the child's id is journaled (with a ``child.started`` event) before the
child is created, and creating is idempotent, so a restarted parent does not start it again.
Waiting for its output is a wait (:mod:`genx_ray.flow._waits`): the parent parks, holding no host,
until the child ends; the child's end is delivered to the parent's journal once (with a
``child.finished`` event) by its host, or by the parent's periodic check if the child ended
some other way. Cancelling the parent cancels its children.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

from genx_ray.flow._context import current_run, current_scope
from genx_ray.flow._waits import CHILD_CHECK_SECONDS, Parked
from genx_ray.model import (
    DEFAULT_PRIORITY,
    ChildFailed,
    ChildStartedEvent,
    JournalEntry,
    RunWaitingEvent,
    StepRef,
    UserError,
    canonical_hash,
    new_run_id,
)
from genx_ray.store import RunStore, keys

if TYPE_CHECKING:
    from genx_ray.flow._workflow import Workflow

R = TypeVar("R")


class ChildRun(Generic[R]):
    """A child run a workflow started: its ``id``, and its output when it ends."""

    def __init__(self, workflow: Workflow[Any, R], run_id: str, result_step: str) -> None:
        self.workflow, self.id, self.result_step = workflow, run_id, result_step

    def __repr__(self) -> str:
        return f"<ChildRun {self.workflow.name} {self.id}>"

    async def result(self) -> R:
        """The child's output, once it ends (the parent waits, holding no host); raises
        :class:`ChildFailed` if it failed or was cancelled."""
        ctx = current_run()
        if ctx is None:
            raise UserError("a child run's result is awaited inside its parent's run")
        entry = ctx.journal.get(self.result_step)
        if entry is None:  # it may have ended since this attempt started
            raw = await ctx.redis.hget(keys.journal(ctx.run_id), self.result_step)
            entry = JournalEntry.loads(str(raw)) if raw is not None else None
        if entry is None:
            ref = StepRef(id=self.result_step, name=f"{self.workflow.name}.result")
            event = RunWaitingEvent(run_id=ctx.run_id, reason="child", step=ref)
            raise Parked(
                self.result_step, "child", [event], {"wait_kind": "child", "wait_child": self.id},
                due=_now() + CHILD_CHECK_SECONDS, ready_if_journaled=True,
            )  # fmt: skip
        outcome = entry.value or {}
        if outcome.get("status") != "succeeded":
            error = outcome.get("error") or {}
            raise ChildFailed(self.id, str(outcome.get("status")), str(error.get("type", "")),
                              str(error.get("message", "")))  # fmt: skip
        decoded: R = self.workflow.output.decode(outcome.get("output"))
        return decoded


async def start_child(workflow: Workflow[Any, R], raw_input: Any) -> ChildRun[R]:
    """Start ``workflow`` as a child run of the current run (see the module)."""
    ctx, scope = current_run(), current_scope()
    if ctx is None or scope is None:
        raise UserError(f"{workflow.name}.start_child works inside a workflow run")
    name = f"{workflow.name}.child"
    step = scope.next_step_id(name)
    payload = workflow.encode_input(raw_input)
    recorded = ctx.recorded(step, name, canonical_hash(payload))
    if recorded is not None:
        child_id = str(recorded.value["child"])
    else:
        child_id = new_run_id()
        entry = JournalEntry(name, canonical_hash(payload), value={"child": child_id})
        started = ChildStartedEvent(
            run_id=ctx.run_id, child_id=child_id, workflow=workflow.name,
            step=StepRef(id=step, name=name),
        )  # fmt: skip
        await ctx.writer.commit([started], [(step, entry.dumps())])
    result_step = f"{step}/result"
    store = RunStore(ctx.redis)
    extra = {"parent_id": ctx.run_id, "parent_step": result_step}
    here = ctx.origin == "local"  # a script's run: its children run in the same process
    queue, runner, priority = await ctx.redis.hmget(
        keys.run(ctx.run_id), "queue", "runner", "priority"
    )
    if here:
        extra.update(origin="local", queue=str(queue), runner=str(runner))
    await store.create(
        workflow.name, payload, tenant=ctx.tenant, run_id=child_id,  # type: ignore[arg-type]
        enqueue=not here, extra=extra, tags=ctx.tags,
        priority=workflow.child_priority or int(priority or DEFAULT_PRIORITY),  # or its parent's
    )  # fmt: skip
    await ctx.redis.sadd(keys.children(ctx.run_id), child_id)
    if here and ctx.start_here is not None:
        await ctx.start_here(child_id, workflow)
    return ChildRun(workflow, child_id, result_step)


def outcome_entry(status: str, output: Any = None, error: dict[str, Any] | None = None) -> str:
    """What a child's end leaves in its parent's journal."""
    value: dict[str, Any] = {"status": status, "output": output}
    if error:
        value["error"] = error
    return JournalEntry("child", "", value=value).dumps()


def _now() -> float:
    import time

    return time.time()
