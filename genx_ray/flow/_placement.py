"""Where placed work runs: the flow's one door to a cluster, given to it rather than imported.

A placed component (``num_cpus=``, ``resources=``, ``node_labels=``, ``remote=True``) runs each
attempt elsewhere, and a large map spreads its items over the cluster. The flow does not know
how: it asks the :class:`Placement` in use. :mod:`genx_ray` installs the Ray one
(:class:`genx_ray.compute.RayPlacement`) when it is imported, so the flow never imports the
compute room and a test can hand it another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from genx_ray.model import UserError

if TYPE_CHECKING:
    from genx_ray.flow._context import RunContext
    from genx_ray.flow._steps import StepSpec

# What a map reports for each item: (index, value or StepError, ok).
Settle = Callable[[int, Any, bool], None]


class Placement(Protocol):
    def active(self) -> bool:
        """Whether this process is on a cluster now (then a large map spreads over it)."""
        ...

    async def run_task(self, spec: StepSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One attempt of ``spec`` on the cluster: its value, or its exception raised here."""
        ...

    async def map_items(
        self,
        spec: StepSpec,
        todo: Sequence[Any],
        indexes: Sequence[int],
        *,
        concurrency: int,
        ctx: RunContext | None,
        map_id: str,
        on_result: Settle,
    ) -> None:
        """Run ``spec`` on ``todo[i]`` for each of ``indexes`` across the cluster, calling
        ``on_result`` for each item as it ends (in a run, after journaling it). Raises
        :class:`~genx_ray.model.Unplaceable` when ``spec`` cannot be sent there."""
        ...


_placement: Placement | None = None


def use_placement(placement: Placement) -> None:
    """Run placed work with ``placement`` from now on (in this process)."""
    global _placement
    _placement = placement


def placement() -> Placement:
    if _placement is None:  # only when genx_ray.flow is used without genx_ray
        raise UserError("no cluster to place work on: import genx_ray (it installs Ray's)")
    return _placement
