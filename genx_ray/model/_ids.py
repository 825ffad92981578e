"""Identifiers: run ids that sort by creation time yet cannot be guessed, and step ids."""

from __future__ import annotations

import secrets
import time
from typing import NewType

RunId = NewType("RunId", str)
"""A run's id: ``run_`` + 26 Crockford base32 characters (48-bit ms timestamp, 80 random bits).

Ids sort lexicographically by creation time, which the run index uses for cursor pagination,
and 80 bits from :mod:`secrets` make them unguessable (the API relies on that for links)."""

StepId = NewType("StepId", str)
"""A step's id within its run: ``<parent>/<position>:<component>``, deterministic for the same code
path, so a restarted run finds each completed step in its journal."""

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
RUN_PREFIX = "run_"


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        out.append(_ALPHABET[rem])
    return "".join(reversed(out))


def new_run_id(now: float | None = None) -> RunId:
    ms = int((time.time() if now is None else now) * 1000)
    return RunId(RUN_PREFIX + _b32(ms, 10) + _b32(secrets.randbits(80), 16))


def is_run_id(value: str) -> bool:
    body = value[len(RUN_PREFIX) :]
    return value.startswith(RUN_PREFIX) and len(body) == 26 and all(c in _ALPHABET for c in body)


# -- step ids: ``<parent>/<position>:<component>`` ------------------------------------------------
# The one place that spells them: the journal is keyed by them, so a change here is a change of
# the journal's format (a restarted run of an older version would not find its steps).


def step_id(parent: str, position: int | str, name: str) -> StepId:
    """The id of the step at ``position`` among the children of ``parent`` (``""``: the body)."""
    return StepId(f"{parent}/{position}:{name}")


def item_step_id(map_id: str, index: int, name: str) -> StepId:
    """Item ``index`` of the map ``map_id``: a step of its own, named after its component."""
    return step_id(map_id, index, name)


def publish_id(parent: str, n: int) -> StepId:
    """The ``n``-th publish from the body: numbered apart (``!``), so steps keep their places."""
    return step_id(parent, f"!{n}", "publish")


def attempt_scope_id(step: str, attempt: int) -> str:
    """The parent id of what attempt ``attempt`` of ``step`` calls: a retried attempt's nested
    steps get their own ids, so a retry runs them again."""
    return step if attempt == 1 else f"{step}@{attempt}"


def position(step: str) -> str:
    """A step id without its component name: where in the code path the step was called."""
    return step.rpartition(":")[0]
