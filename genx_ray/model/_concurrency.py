"""A workflow's concurrency limit: at most ``limit`` of its runs with the same value of an input
field running at once, across every worker (:class:`Concurrency`; enforced by the worker, see
:mod:`genx_ray.store._concurrency`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from genx_ray.model._errors import UserError


@dataclass(frozen=True, slots=True)
class Concurrency:
    """At most ``limit`` runs of the workflow at once per value of the input field ``key`` (a
    dotted path into the input, ``"user"`` or ``"account.id"``); without ``key``, ``limit`` for
    the whole workflow. A run over it stays ``queued`` (holding no host slot) and starts, in
    order, when one with its key ends or parks in a durable wait (a parked run does not count).
    A run whose input lacks the field shares the limit with the others that lack it."""

    limit: int
    key: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise UserError(
                f"Concurrency(limit=...) must be a positive integer, not {self.limit!r}"
            )
        if self.key is not None and (not isinstance(self.key, str) or not self.key.strip(".")):
            raise UserError(f"Concurrency(key=...) must be a dotted field path, not {self.key!r}")

    def value(self, input: Any) -> str:
        """The key's value in a run's input, as a short stable digest ("" without ``key``)."""
        if self.key is None:
            return ""
        found: Any = input
        for part in self.key.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        text = json.dumps(found, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:24]
