"""A run's journal: the recorded outcome of each step, by step id (``genx:run:{id}:journal``).

A restarted attempt replays its journal: a step whose id is there returns its recorded value (or
raises its recorded error) instead of running again. An entry also keeps a hash of the step's
input, so a replay that calls the step with another input is caught (nondeterminism).
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

    def dumps(self) -> str:
        data: dict[str, Any] = {"c": self.component, "h": self.input_hash}
        if self.error is not None:
            data["e"] = self.error
        else:
            data["v"] = self.value
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def loads(cls, raw: str) -> JournalEntry:
        d = json.loads(raw)
        return cls(component=d["c"], input_hash=d["h"], value=d.get("v"), error=d.get("e"))
