"""Showing a run as it happens in a terminal: a progress bar for batches, output as it streams."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from genx_ray.client import ApiError, Client

WAIT_EVENTS = {"run.waiting", "run.resumed", "input.received", "child.started", "child.finished"}
WAIT_DETAIL = {"reason", "until", "input", "child_id", "workflow", "status"}


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
            elif e.type == "input.requested":
                _ask(progress.console, client, run_id, e)
            elif e.type in WAIT_EVENTS:
                if e.type == "input.received":
                    _Answers.done(e.input_id)
                detail = {k: v for k, v in e.model_dump(mode="json").items() if k in WAIT_DETAIL}
                if detail.get("until"):
                    detail["until"] = _clock(detail["until"])
                progress.console.print(f"[dim]{e.type} {json.dumps(detail)}[/dim]")
    run = client.get(run_id)
    if run["status"] == "succeeded":
        out.print_json(json.dumps(run["output"]))
    else:
        err.print(f"[red]run {run['status']}[/red] {json.dumps(run.get('error'))}")
    return str(run["status"])


def _ask(console: Console, client: Client, run_id: str, e: Any) -> None:
    """Say what the run asks for and how to answer; answer from stdin if a line comes."""
    fields = e.input_schema.get("properties", {})
    deadline = f", until {_clock(e.deadline)}" if e.deadline else ""
    console.print(f"[bold]the run waits for input{deadline}:[/bold] {e.prompt or ''}")
    console.print(f"  fields: {', '.join(fields) or '(see the schema)'}")
    example = json.dumps({k: v["default"] for k, v in fields.items() if "default" in v})
    console.print(
        f"  answer: GENX_API_URL={client.base_url} genx runs input {run_id} --data '{example}'",
        markup=False, highlight=False, soft_wrap=True,
    )  # fmt: skip
    console.print(
        f"     or: curl -X POST {client.base_url}/v1/runs/{run_id}/input "
        f"-H 'Content-Type: application/json' -d '{{\"input\": {example}}}'",
        markup=False, highlight=False, soft_wrap=True,
    )  # fmt: skip
    console.print("     or: type the JSON here and press Enter (Enter alone sends {})")
    _Answers.ask(console, client, run_id, e.input_id)


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


class _Answers:
    """One reader of stdin for the whole session: each line is sent as the input the run asks
    for now (the latest ``input.requested``) until one is taken."""

    pending: tuple[Console, Client, str, str] | None = None
    lock = threading.Lock()
    reader: threading.Thread | None = None

    @classmethod
    def ask(cls, console: Console, client: Client, run_id: str, input_id: str) -> None:
        with cls.lock:
            cls.pending = (console, client, run_id, input_id)
            if cls.reader is None:
                cls.reader = threading.Thread(target=cls._read, daemon=True)
                cls.reader.start()

    @classmethod
    def done(cls, input_id: str) -> None:
        with cls.lock:
            if cls.pending and cls.pending[3] == input_id:
                cls.pending = None

    @classmethod
    def _read(cls) -> None:
        for line in sys.stdin:
            with cls.lock:
                pending = cls.pending
            if pending is None:
                continue
            console, client, run_id, input_id = pending
            try:
                client.send_input(run_id, json.loads(line) if line.strip() else {}, input_id)
            except json.JSONDecodeError as exc:
                console.print(f"[red]not JSON ({exc}); try again[/red]")
                continue
            except ApiError as exc:
                console.print(f"[red]{exc}[/red]")
                if exc.status == 422:
                    continue
            with cls.lock:
                if cls.pending == pending:
                    cls.pending = None
