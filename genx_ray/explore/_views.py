"""What :mod:`genx_ray.explore._frames` shows of a run besides data frames: the timeline figure (step
attempts as bars, map progress over time) and the live progress view of ``watch`` (one display
updated in place in a notebook, a line per change elsewhere).
"""

from __future__ import annotations

import html
import io
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from pydantic import ValidationError

from genx_ray.model import Event, MapProgress, ProgressEvent, Run
from genx_ray.store import StreamEntry

if TYPE_CHECKING:
    from matplotlib.axes import Axes


# Bar colors of the timeline, by what an attempt came to.
COLORS = {
    "succeeded": "#4c9f70",
    "cached": "#8e6cc9",
    "replayed": "#b5b5b5",
    "retried": "#e8a33d",
    "failed": "#d1495b",
    "running": "#3b7dd8",
    "interrupted": "#6e6e6e",
    "cancelled": "#6e6e6e",
}


def timestamp(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def typed(entry: StreamEntry) -> Event | None:
    """The entry's event, or None for a type this version does not know."""
    try:
        return entry.event
    except ValidationError:
        return None


def event_ts(entry: StreamEntry) -> float | None:
    event = typed(entry)
    return None if event is None else event.ts


# -- the timeline figure -----------------------------------------------------------------------


def draw(run: Run, steps: pd.DataFrame, maps: pd.DataFrame) -> Figure:
    origin = run.created_at.timestamp()
    now = max(time.time(), timestamp(run.finished_at) or 0.0)
    end = timestamp(run.finished_at) or now
    bars = steps[steps["start"].notna()]
    labels = list(dict.fromkeys(bars["step_id"]))  # one lane per step, in order of first start
    lanes = {step_id: i for i, step_id in enumerate(labels)}
    height = min(14.0, 1.4 + 0.28 * max(len(labels), 2))
    panels = 2 if len(maps) else 1
    fig = NotebookFigure(figsize=(10, height + (2.2 if panels == 2 else 0)), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False,
                        height_ratios=[height, 2.2] if panels == 2 else None)[:, 0]  # fmt: skip
    gantt: Axes = axes[0]
    span = max(end - origin, 1e-3)
    min_width = span * 0.004  # a cache hit takes no time, yet must show
    seen: dict[str, str] = {}
    for r in bars.itertuples(index=False):
        start = r.start.timestamp() - origin
        stop = (r.end.timestamp() if pd.notna(r.end) else now) - origin
        look = "cached" if r.cached else "replayed" if r.replayed else str(r.status)
        gantt.barh(lanes[r.step_id], max(stop - start, min_width), left=start, height=0.6,
                   color=COLORS.get(look, "#999999"), edgecolor="none")  # fmt: skip
        seen.setdefault(look, COLORS.get(look, "#999999"))
    gantt.set_yticks(range(len(labels)))
    gantt.set_yticklabels([s.lstrip("/") for s in labels] if len(labels) <= 60 else [])
    gantt.set_ylim(len(labels) - 0.5 if labels else 0.5, -0.5)
    gantt.grid(axis="x", alpha=0.3)
    if not labels:
        gantt.text(0.5, 0.5, "no steps yet", transform=gantt.transAxes, ha="center")
    if seen:
        handles = [Patch(color=color, label=look) for look, color in seen.items()]
        gantt.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    state = run.status.value if run.status.terminal else f"{run.status.value} (so far)"
    gantt.set_title(f"{run.workflow} {run.id}: {state}, {end - origin:.1f} s", fontsize="medium")
    if panels == 2:
        progress: Axes = axes[1]
        started = dict(zip(steps["step_id"], steps["start"], strict=True))
        for step_id, points in maps.groupby("step_id", sort=False):
            last = points.iloc[-1]
            xs = [t.timestamp() - origin for t in points["ts"]]
            ys = list(points["done"])
            first = started.get(step_id)
            if first is not None and pd.notna(first):  # the map began at 0 done
                xs, ys = [first.timestamp() - origin, *xs], [0, *ys]
            label = f"{last['name']}: {last['done']}/{last['total']}, {last['failed']} failed"
            (line,) = progress.plot(xs, ys, marker=".", label=label)
            if last["failed"]:  # the failed ones among them, dotted, in the same color
                fails = list(points["failed"]) if len(xs) == len(points) else [0, *points["failed"]]
                progress.plot(xs, fails, linestyle=":", color=line.get_color())
        progress.set_ylabel("items done")
        progress.grid(alpha=0.3)
        progress.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    axes[-1].set_xlabel("seconds since the run was created")
    axes[-1].set_xlim(0, span * 1.02)
    return fig


class NotebookFigure(Figure):
    """A Figure that shows as a PNG in a notebook without pyplot: no global figure to leak or to
    show twice, whatever backend the kernel has set up."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=96)
        return buf.getvalue()


# -- the live progress view --------------------------------------------------------------------


class ProgressView:
    """What :meth:`Explorer.watch` shows: the run's status and one bar per map."""

    WIDTH = 30

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.status = "queued"
        self.maps: dict[str, tuple[str, MapProgress]] = {}
        self.handle: Any = None
        self.shell = _ipython()

    def add(self, entry: StreamEntry) -> None:
        """Take an event in, and show what it changed."""
        if entry.type == "progress":
            event = typed(entry)
            if isinstance(event, ProgressEvent) and event.kind == "map":
                p = MapProgress.model_validate(event.data)
                self.maps[p.step] = (event.step.name if event.step else p.step, p)
                self.show(self.bar(*self.maps[p.step]))
        elif entry.type.startswith("run."):
            self.status = entry.type.removeprefix("run.")
            self.show(self.headline())

    def finish(self, run: Run) -> None:
        """The run as it ended (its terminal event has usually told already)."""
        if self.status != run.status.value:
            self.status = run.status.value
            self.show(self.headline())

    def headline(self) -> str:
        return f"{self.run_id}: {self.status}"

    def bar(self, name: str, p: MapProgress) -> str:
        filled = round(self.WIDTH * p.done / p.total) if p.total else self.WIDTH
        bar = "#" * filled + "." * (self.WIDTH - filled)
        eta = "" if p.eta is None else f", eta {p.eta:.1f}s"
        return f"{name} [{bar}] {p.done}/{p.total}, {p.failed} failed, {p.rate:.0f}/s{eta}"

    def bundle(self) -> dict[str, str]:
        """The whole view as a MIME bundle: HTML progress elements, and the same as text."""
        lines = [self.headline()]
        rows = [f"<div><code>{html.escape(lines[0])}</code></div>"]
        for name, p in self.maps.values():
            lines.append(self.bar(name, p))
            rows.append(
                f'<div><progress value="{p.done}" max="{max(p.total, 1)}" style="width:18em">'
                f"</progress> <code>{html.escape(lines[-1])}</code></div>"
            )
        return {"text/plain": "\n".join(lines), "text/html": "".join(rows)}

    def show(self, changed: str) -> None:
        """In a notebook, the whole view in one display updated in place; elsewhere the line
        that changed."""
        if self.shell is None:
            print(changed, flush=True)
            return
        from IPython.display import display

        if self.handle is None:
            self.handle = cast(Any, display)(self.bundle(), raw=True, display_id=True)
        else:
            self.handle.update(self.bundle(), raw=True)


def _ipython() -> Any:
    """The running IPython shell (a notebook's kernel), if any."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()
