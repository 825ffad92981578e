"""The engine: a process that executes runs, many at once, each an asyncio task.

An :class:`Executor` per process (a run host, an inline worker, a script) shares what is costly
between its runs: one Redis pool, one batched writer, one lease renewer, one listener for
cancels, one watchdog. Each attempt of a run claims the run, replays its journal, runs the
workflow body and records how it ended. No Ray here: the compute room hosts the engine on Ray.
"""

from genx_ray.engine._attempt import tell_parent
from genx_ray.engine._executor import Executor

__all__ = ["Executor", "tell_parent"]
