"""The Ray cluster as the flow's :class:`~genx_ray.flow.Placement`: placed attempts as Ray tasks
(:mod:`._tasks`), large maps over the map actors (:mod:`._mappers`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from genx_ray.compute._map_actors import map_on_cluster
from genx_ray.compute._tasks import run_as_task
from genx_ray.flow import RunContext, Settle, StepSpec


class RayPlacement:
    def active(self) -> bool:
        ray = sys.modules.get("ray")  # never imports Ray: only a process that started it is on it
        return ray is not None and bool(ray.is_initialized())

    async def run_task(self, spec: StepSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return await run_as_task(spec, args, kwargs)

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
        await map_on_cluster(
            spec, todo, indexes, concurrency=concurrency, ctx=ctx, map_id=map_id,
            on_result=on_result,
        )  # fmt: skip
