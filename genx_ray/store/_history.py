"""What a run did, read back: its steps (``GET /v1/runs/{id}/steps``) from its events and its
journal (:func:`genx_ray.model.build_steps` makes the view; this reads what it needs).

Only the events a step view uses are parsed (step, run and map progress events, and the waits'
``run.waiting``); the rest of a stream (output chunks, LLM usage) is skipped by its type, which
the stream entry holds apart. Works on running and finished runs alike: a running run's steps are
a snapshot.
"""

from __future__ import annotations

from typing import Any, cast

from genx_ray.model import BaseEvent, StepView, build_steps
from genx_ray.store import _keys as keys
from genx_ray.store._streams import parse_entries

EVENTS_PAGE = 5000  # stream entries per XRANGE
_TYPES = ("step.", "run.")


async def read_journal(redis: Any, run_id: str) -> dict[str, str]:
    """The run's journal: step id -> entry, as stored."""
    return cast(dict[str, str], await redis.hgetall(keys.journal(run_id)))


def _step_events(raw: Any, out: list[BaseEvent | None]) -> str | None:
    """Add the events of a page a step view uses to ``out``; the page's last id if it was
    full (there may be more), else None."""
    page = parse_entries(raw)
    for entry in page:
        wanted = entry.type.startswith(_TYPES) or (
            entry.type == "progress" and '"kind":"map"' in entry.data
        )
        if wanted:
            try:
                out.append(cast(BaseEvent, entry.event))
            except ValueError:  # a type a newer version added
                out.append(None)
    return page[-1].id if len(page) == EVENTS_PAGE else None


async def read_history(redis: Any, run_id: str) -> tuple[list[StepView], dict[str, str]]:
    """The run's steps in call order (see :mod:`genx_ray.model._steps`) and its journal (step
    id -> entry, as stored); a run of up to ``EVENTS_PAGE`` events in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xrange(keys.events(run_id), "-", "+", count=EVENTS_PAGE)
        pipe.hgetall(keys.journal(run_id))
        raw, journal = await pipe.execute()
    events: list[BaseEvent | None] = []
    after = _step_events(raw, events)
    while after is not None:
        raw = await redis.xrange(keys.events(run_id), f"({after}", "+", count=EVENTS_PAGE)
        after = _step_events(raw, events)
    return build_steps(events, journal), cast(dict[str, str], journal)
