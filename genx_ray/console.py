"""Showing a run as it happens in a terminal: a progress bar for batches, output as it streams."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from genx_ray.client import Client


def follow(client: Client, run_id: str) -> str:
    """Print a run's progress until it ends; returns its final status."""
    err = Console(stderr=True)
    out = Console()
    bars: dict[str, Any] = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, transient=False,
    ) as progress:  # fmt: skip
        for entry in client.events(run_id):
            e: Any = entry.event
            if e.type == "progress" and e.kind == "map" and isinstance(e.data, dict):
                step = e.data.get("step", "map")
                if step not in bars:
                    bars[step] = progress.add_task(
                        e.step.name if e.step else step, total=e.data["total"]
                    )
                progress.update(bars[step], completed=e.data["done"])
            elif e.type == "progress":
                progress.console.print(f"[dim]{e.kind}[/dim] {json.dumps(e.data)}")
            elif e.type == "output":
                progress.console.print(str(e.data), end="", markup=False, highlight=False)
            elif e.type in ("step.retrying", "step.failed"):
                progress.console.print(f"[yellow]{e.type}[/yellow] {e.step.id}: {e.error.message}")
            elif e.type in ("run.started", "run.restarted"):
                progress.console.print(f"[dim]{e.type} (attempt {e.attempt})[/dim]")
    run = client.get(run_id)
    if run["status"] == "succeeded":
        out.print_json(json.dumps(run["output"]))
    else:
        err.print(f"[red]run {run['status']}[/red] {json.dumps(run.get('error'))}")
    return str(run["status"])
