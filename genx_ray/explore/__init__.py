"""Runs as data, for notebooks: data frames of runs, events, step attempts, map progress and LLM
usage; a run's timeline; a live progress view. See :mod:`genx_ray.explore._frames` for how they
are read. ``import genx_ray`` never imports this package (nor pandas or matplotlib)."""

from genx_ray.explore._frames import (
    EVENT_COLUMNS,
    MAP_COLUMNS,
    RUN_COLUMNS,
    STEP_COLUMNS,
    Explorer,
    events_frame,
    map_progress_frame,
    runs_frame,
    steps_frame,
    timeline,
    usage_frame,
    watch,
)

__all__ = [
    "EVENT_COLUMNS",
    "MAP_COLUMNS",
    "RUN_COLUMNS",
    "STEP_COLUMNS",
    "Explorer",
    "events_frame",
    "map_progress_frame",
    "runs_frame",
    "steps_frame",
    "timeline",
    "usage_frame",
    "watch",
]
