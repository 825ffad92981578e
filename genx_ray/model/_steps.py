"""A run's steps as data: rebuilt from its events and its journal, and the order they were called.

Two readers share this: the API's steps view (``GET /v1/runs/{id}/steps``, one entry per step)
and the notebooks' step attempts (:mod:`genx_ray.explore`, one row per attempt). Both rebuild
attempts from the step events alone (:func:`step_attempts`): ``step.started`` opens an attempt,
``step.retrying`` ends one (the next starts after its ``delay``), ``step.completed`` /
``step.failed`` end the last one, ``run.restarted`` and the terminal event end whatever was left
open. The steps view adds the journal (:func:`build_steps`): what a step returned is there even
when the stream was trimmed, and map items, which are quiet (no events of their own), are only
there; a map is one entry that counts them.

The order of steps is the order the run's code called them, which step ids carry: a step's id is
``<parent>/<position>:<component>`` with positions counted per parent at call time, so sorting
ids by their positions, parents before their children (:func:`order_key`), gives the call order.
It is the same for every attempt and every rerun of the same code path, needs nothing recorded,
and for code that awaits its steps one by one it is the order they completed. A rerun "from a
step" reuses what was called before it (:func:`rerun_entries`): a step called earlier cannot
depend on the step's result, so reusing it is safe whatever ran concurrently.

Pure data: no I/O (the store reads the events and the journal, see ``RunStore.steps``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel

from genx_ray.model._events import (
    BaseEvent,
    ErrorInfo,
    MapProgress,
    ProgressEvent,
    RunCancelledEvent,
    RunRestartedEvent,
    RunStartedEvent,
    RunWaitingEvent,
    StepCompletedEvent,
    StepFailedEvent,
    StepRetryingEvent,
    StepStartedEvent,
)
from genx_ray.model._journal import JournalEntry, as_reused

MAX_FAILED_ITEMS = 1000  # failed items a map's entry lists (``failed`` counts them all)
# A rerun's ``from_step`` when it reuses every step the run completed (it goes on from where the
# run stopped): a bulk rerun "from the failed step" of a run that has none (cancelled, its host
# lost too often, its body failed between steps).
WHERE_IT_STOPPED = "*"
PUBLISH = "publish"  # the component name of a publish from the body (journaled, not a step)


# -- the order of steps ---------------------------------------------------------------------------


def _segment_key(segment: str) -> tuple[int, int, int]:
    position, colon, name = segment.partition(":")
    if not colon:  # a fixed sub-step, e.g. a child run's "result": after its parent's others
        return (2, 0, 0)
    attempt = name.rpartition("@")[2] if "@" in name else "1"
    if position.startswith("!"):  # a publish (numbered apart)
        return (1, _int(position[1:]), 0)
    return (0, _int(position), _int(attempt))


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


def order_key(step_id: str) -> tuple[tuple[int, int, int], ...]:
    """Sort key of step ids in call order: by position at each level, a parent before what it
    called (and attempt ``n`` of a step's nested steps, ``<step>@<n>/...``, after attempt n-1's)."""
    return tuple(_segment_key(s) for s in step_id.split("/")[1:])


def is_inside(step_id: str, parent: str) -> bool:
    """Whether ``step_id`` was called under ``parent`` (by any of its attempts)."""
    return step_id.startswith((parent + "/", parent + "@"))


def parent_of(step_id: str) -> str:
    """The step ``step_id`` was called under ("" at the top; a retried attempt's nested steps
    belong to their step, without the ``@<attempt>``)."""
    parent = step_id.rpartition("/")[0]
    head, _, last = parent.rpartition("/")
    return f"{head}/{last.partition('@')[0]}" if last else ""


def _map_of(step_id: str) -> str | None:
    """The map a step id is an item of, or None."""
    parent = step_id.rpartition("/")[0]
    return parent if parent.rpartition(":")[2].endswith(".map") else None


# -- step attempts from events ----------------------------------------------------------------


def step_attempts(events: Iterable[BaseEvent | None]) -> list[dict[str, Any]]:
    """Step attempt rows (start/end as unix seconds), in the order they started: ``step_id``,
    ``name``, ``parent``, ``attempt``, ``kind`` (step, map, item), ``status`` (running,
    succeeded, retried, failed, interrupted, cancelled), ``start``, ``end``, ``cached``,
    ``replayed``, ``reused``, ``error_type``, ``error``, ``run_attempt``. ``events``: the run's,
    in stream order (None for one this version does not know)."""
    rows: list[dict[str, Any]] = []
    running: dict[str, dict[str, Any]] = {}  # step id -> its attempt in flight
    run_attempt, order = 1, 0

    def row(
        step_id: str, name: str, attempt: int, start: float | None, at: float
    ) -> dict[str, Any]:
        nonlocal order
        order += 1
        parent, _, _ = step_id.rpartition("/")
        is_item = parent.rpartition(":")[2].endswith(".map")
        return {
            "step_id": step_id, "name": name, "parent": parent, "attempt": attempt,
            "kind": "item" if is_item else "map" if name.endswith(".map") else "step",
            "status": "running", "start": start, "end": None, "cached": False, "replayed": False,
            "reused": False, "error_type": None, "error": None, "run_attempt": run_attempt,
            "_order": (at, order),
        }  # fmt: skip

    def close(r: dict[str, Any], status: str, at: float) -> None:
        r["status"], r["end"] = status, at
        rows.append(r)

    def stop_all(status: str, at: float) -> None:
        for r in running.values():
            close(r, status, at)
        running.clear()

    for e in events:
        if isinstance(e, RunStartedEvent):
            run_attempt = e.attempt
        elif isinstance(e, RunRestartedEvent):
            stop_all("interrupted", e.ts)
            run_attempt = e.attempt
        elif isinstance(e, StepStartedEvent):
            if e.step.id in running:  # started again without an end: its attempt was cut off
                close(running.pop(e.step.id), "interrupted", e.ts)
            running[e.step.id] = row(e.step.id, e.step.name, e.step.attempt, e.ts, e.ts)
        elif isinstance(e, StepRetryingEvent):
            r = running.pop(e.step.id, None)
            if r is None:  # a quiet map item: its attempts are not recorded but for this one
                r = row(e.step.id, e.step.name, e.step.attempt, None, e.ts)
            r["attempt"] = e.step.attempt
            r["error_type"], r["error"] = e.error.type, e.error.message
            close(r, "retried", e.ts)
            if r["kind"] != "item":  # its next attempt starts after the backoff
                nxt = e.step.attempt + 1
                running[e.step.id] = row(
                    e.step.id, e.step.name, nxt, e.ts + e.delay, e.ts + e.delay
                )
        elif isinstance(e, StepCompletedEvent):
            r = running.pop(e.step.id, None)
            if r is None:  # a cache hit or a replay: no attempt ran, it ends where it starts
                r = row(e.step.id, e.step.name, e.step.attempt, e.ts, e.ts)
            r["attempt"], r["cached"], r["replayed"] = e.step.attempt, e.cached, e.replayed
            r["reused"] = e.reused
            close(r, "succeeded", e.ts)
        elif isinstance(e, StepFailedEvent):
            r = running.pop(e.step.id, None)
            if r is None:  # a replayed failure, or a quiet map item's (no start recorded)
                start = e.ts if e.replayed or e.reused else None
                r = row(e.step.id, e.step.name, e.step.attempt, start, e.ts)
            r["attempt"], r["replayed"], r["reused"] = e.step.attempt, e.replayed, e.reused
            r["error_type"], r["error"] = e.error.type, e.error.message
            close(r, "failed", e.ts)
        elif e is not None and e.terminal:
            stop_all("cancelled" if isinstance(e, RunCancelledEvent) else "interrupted", e.ts)
    for r in running.values():  # still in flight: the run is running
        r["end"] = None
        rows.append(r)
    rows.sort(key=lambda r: r["_order"])
    for r in rows:
        del r["_order"]
    return rows


# -- the steps view ---------------------------------------------------------------------------


class FailedItem(BaseModel):
    index: int
    id: str
    error: ErrorInfo


class StepView(BaseModel):
    """One step of a run, as ``GET /v1/runs/{id}/steps`` shows it. A map is one entry: its
    ``items`` (as many as it was given, when known), ``done`` (finished, failed included),
    ``failed``, and its failed items (at most :data:`MAX_FAILED_ITEMS`)."""

    id: str
    component: str
    kind: Literal["step", "map", "wait"] = "step"
    parent: str = ""
    status: str  # running, succeeded, failed, interrupted, cancelled, waiting
    attempts: int = 0  # attempts that ran (0: none ran here: cached, reused or replayed only)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cached: bool = False
    reused: bool = False  # from the journal of the run this one reruns (not executed here)
    error: ErrorInfo | None = None
    items: int | None = None
    done: int | None = None
    failed: int | None = None
    failed_items: list[FailedItem] | None = None

    @property
    def has_failures(self) -> bool:
        """Failed, or a map with failed items (which its workflow may have carried on past)."""
        return self.status == "failed" or bool(self.failed)


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def build_steps(
    events: Iterable[BaseEvent | None], journal: Mapping[str, str | JournalEntry]
) -> list[StepView]:
    """The run's steps in call order (see the module), from its events (in stream order; None
    for one this version does not know) and its journal (step id -> entry)."""
    events = list(events)
    steps: dict[str, StepView] = {}
    totals: dict[str, int] = {}  # map id -> items, from its progress events
    for e in events:
        if isinstance(e, ProgressEvent) and e.kind == "map" and isinstance(e.data, dict):
            progress = MapProgress.model_validate(e.data)
            totals[progress.step] = progress.total
        elif isinstance(e, RunWaitingEvent) and e.step is not None:
            steps.setdefault(e.step.id, StepView(
                id=e.step.id, component=e.step.name, kind="wait", parent=parent_of(e.step.id),
                status="waiting", started_at=_ts(e.ts),
            ))  # fmt: skip
    for r in step_attempts(events):
        if r["kind"] == "item":
            continue  # counted from the journal, with its map
        step = steps.get(r["step_id"])
        if step is None or step.kind == "wait":
            step = steps[r["step_id"]] = StepView(
                id=r["step_id"], component=r["name"], parent=parent_of(r["step_id"]),
                kind="map" if r["kind"] == "map" else "step", status=r["status"],
            )  # fmt: skip
        ran = not (r["replayed"] or r["reused"] or r["cached"])
        if ran and r["start"] is not None:
            step.attempts = max(step.attempts, r["attempt"])
            if step.started_at is None or step.reused:
                step.started_at = _ts(r["start"])
            step.finished_at = _ts(r["end"])
        elif step.started_at is None:  # only replayed (or cached): when it was
            step.started_at, step.finished_at = _ts(r["start"]), _ts(r["end"])
        step.status = "running" if r["status"] == "retried" else r["status"]
        step.cached = step.cached or r["cached"]
        step.reused = r["reused"] or (step.reused and not ran)
        if r["error_type"] is not None:
            step.error = ErrorInfo(type=r["error_type"], message=r["error"] or "")
        elif r["status"] == "succeeded":
            step.error = None
    _add_journal(steps, journal, totals)
    for map_id, total in totals.items():
        if map_id in steps:
            steps[map_id].items = total
    return sorted(steps.values(), key=lambda s: order_key(s.id))


def _add_journal(
    steps: dict[str, StepView], journal: Mapping[str, str | JournalEntry], totals: dict[str, int]
) -> None:
    for step_id in sorted(journal, key=order_key):
        raw = journal[step_id]
        entry = raw if isinstance(raw, JournalEntry) else JournalEntry.loads(raw)
        if entry.component == PUBLISH:
            continue
        map_id = _map_of(step_id)
        if map_id is not None:
            m = steps.get(map_id)
            if m is None:  # its events were trimmed
                name = map_id.rpartition(":")[2]
                m = steps[map_id] = StepView(
                    id=map_id, component=name, kind="map", parent=parent_of(map_id),
                    status="interrupted",
                )  # fmt: skip
            m.done = (m.done or 0) + 1
            m.failed = m.failed or 0
            m.failed_items = m.failed_items or []
            if entry.error is not None:
                m.failed += 1
                if len(m.failed_items) < MAX_FAILED_ITEMS:
                    index = _int(step_id.rpartition("/")[2].partition(":")[0])
                    error = ErrorInfo(type=str(entry.error.get("type", "Error")),
                                      message=str(entry.error.get("message", "")))  # fmt: skip
                    m.failed_items.append(FailedItem(index=index, id=step_id, error=error))
            continue
        step = steps.get(step_id)
        if step is None or step.kind == "wait":
            kind = step.kind if step is not None else "step"
            started = step.started_at if step is not None else None
            step = steps[step_id] = StepView(
                id=step_id, component=entry.component, kind=kind, parent=parent_of(step_id),
                status="succeeded", started_at=started,
            )  # fmt: skip
        step.reused = step.reused or (entry.reused and step.attempts == 0)
        if entry.error is not None:
            step.status = "failed"
            step.attempts = max(step.attempts, int(entry.error.get("attempts", 1)))
            step.error = ErrorInfo(type=str(entry.error.get("type", "Error")),
                                   message=str(entry.error.get("message", "")))  # fmt: skip
        else:
            step.status, step.error = "succeeded", None
    for m in steps.values():
        if m.kind == "map" and m.done is None:
            m.done, m.failed, m.failed_items = 0, 0, []
        if m.kind == "map" and m.items is None:
            m.items = totals.get(m.id, m.done)


def first_failed(steps: Iterable[StepView]) -> str | None:
    """The first step (in call order) that failed, or a map with failed items; None if none."""
    return next((s.id for s in steps if s.has_failures), None)


def rerun_entries(
    journal: Mapping[str, str], from_step: str | None, steps: Iterable[StepView] = ()
) -> dict[str, str]:
    """What a rerun's journal starts with: the entries of ``journal`` (the run it reruns) called
    before ``from_step``, and not under it, each marked reused; all of them (but publishes)
    when ``from_step`` is :data:`WHERE_IT_STOPPED`, none when it is None (from the start).
    ``from_step`` naming a map (one of ``steps`` of kind map) also keeps its items that
    succeeded: only its failed (and unfinished) items run again."""
    if from_step is None:
        return {}
    maps = {s.id for s in steps if s.kind == "map"}
    out: dict[str, str] = {}
    limit = order_key(from_step)
    for step_id, raw in journal.items():
        entry = JournalEntry.loads(raw)
        if entry.component == PUBLISH:
            continue  # the rerun publishes again: its own stream has its own events
        if entry.component.endswith(".child") and f"{step_id}/result" not in journal:
            continue  # a child run that had not ended: the rerun starts one of its own
        if from_step == WHERE_IT_STOPPED:
            keep = True
        elif from_step in maps and _map_of(step_id) == from_step:
            keep = entry.error is None
        else:
            keep = (
                order_key(step_id) < limit
                and not is_inside(from_step, step_id)  # an enclosing step runs again
                and not is_inside(step_id, from_step)
            )
        if keep:
            out[step_id] = as_reused(raw)
    return out
