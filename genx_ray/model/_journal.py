"""A run's journal: the recorded outcome of each step, by step id (``genx:run:{id}:journal``).

A restarted attempt replays its journal: a step whose id is there returns its recorded value (or
raises its recorded error) instead of running again. An entry also keeps a hash of the step's
input, so a replay that calls the step with another input is caught (nondeterminism).

A rerun (``POST /v1/runs/{id}/rerun``) starts its journal as a copy of entries of the run it
reruns, each marked ``reused``: replayed like any entry (the step does not run), its event says
``reused``, and a reused entry called with another input (a rerun given a new input) is not an
error but a step to run again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass
class JournalEntry:
    """A step's recorded outcome: its input hash, and a value or an error."""

    component: str
    input_hash: str
    value: Any = None
    error: dict[str, Any] | None = None
    reused: bool = False  # copied from the journal of the run this one reruns

    def dumps(self) -> str:
        data: dict[str, Any] = {"c": self.component, "h": self.input_hash}
        if self.error is not None:
            data["e"] = self.error
        else:
            data["v"] = self.value
        if self.reused:
            data["r"] = 1
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def loads(cls, raw: str) -> JournalEntry:
        d = json.loads(raw)
        return cls(
            component=d["c"], input_hash=d["h"], value=d.get("v"), error=d.get("e"),
            reused=bool(d.get("r")),
        )  # fmt: skip


def as_reused(raw: str) -> str:
    """A journal entry (as stored) copied into a rerun's journal: the same, marked reused."""
    entry = JournalEntry.loads(raw)
    entry.reused = True
    return entry.dumps()
