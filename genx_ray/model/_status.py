"""A run's status, and which statuses end a run: the one definition every module uses."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """Where a run is: ``scheduled`` or ``queued`` before it starts, ``running`` on a run host,
    ``waiting`` parked on a durable wait, then one of the terminal ``succeeded``, ``failed`` or
    ``cancelled`` (nothing leaves a terminal status)."""

    SCHEDULED = "scheduled"  # created to start later (start_at, delay_seconds, a schedule)
    QUEUED = "queued"  # accepted, waiting for a worker (or for a restart)
    RUNNING = "running"  # a run host is executing it
    WAITING = "waiting"  # parked: waiting for input, a timer or a child run; no host holds it
    SUCCEEDED = "succeeded"  # finished; ``output`` is set
    FAILED = "failed"  # an uncaught error or too many restarts; ``error`` says why
    CANCELLED = "cancelled"  # stopped on request

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


# A str compares (and hashes) equal to its StrEnum member: ``"failed" in TERMINAL`` holds too.
TERMINAL: frozenset[RunStatus] = frozenset(
    {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED}
)
