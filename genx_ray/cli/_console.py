"""Showing a run as it happens in a terminal: a progress bar for batches, output as it streams.

What a reader sees must read right in a terminal and in a file alike (``genx demo > out.txt``):
streamed output ends with a newline before anything else is printed; a line of machine-readable
JSON is never wrapped (a terminal wraps it visually, a file keeps one line); off a terminal, a
map is one line when it ends, not a progress bar drawn at the end.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from genx_ray.client import ApiError, Client

WAIT_EVENTS = {"run.waiting", "run.resumed", "input.received", "child.started", "child.finished"}
WAIT_DETAIL = {"reason", "until", "input", "child_id", "workflow", "status"}


class _Lines:
    """Prints to a console so that streamed output (no newline of its own) is ended with one
    before any other line, and lines are never wrapped."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.open = False  # streamed output printed, its line not ended yet

    def stream(self, text: str) -> None:
        if text:
            self.console.print(text, end="", markup=False, highlight=False, soft_wrap=True)
            self.open = not text.endswith("\n")

    def line(self, label: str, text: str = "", style: str = "dim") -> None:
        self.end_stream()
        line = Text(label, style=style)
        if text:
            line.append(" " + text)
        self.console.print(line, soft_wrap=True, highlight=False)

    def end_stream(self) -> None:
        if self.open:
            self.console.print(soft_wrap=True)
            self.open = False


def follow(client: Client, run_id: str) -> str:
    """Print a run's progress until it ends; returns its final status."""
    err = Console(stderr=True)
    out = Console()
    bars: dict[str, Any] = {}
    shown: dict[str, Any] = {}  # each map's batch, as last shown
    live = err.is_terminal  # off a terminal (a file, a pipe), a line per map, once it ended
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, transient=False, disable=not live,
    ) as progress:  # fmt: skip
        lines = _Lines(progress.console)
        for entry in client.events(run_id):
            e: Any = entry.event
            if e.type == "progress" and e.kind == "map" and isinstance(e.data, dict):
                step = e.data.get("step", "map")
                name = e.step.name if e.step else step
                batch = e.data.get("batch")
                if isinstance(batch, dict) and batch != shown.get(step):  # map(llm="batch")
                    shown[step] = batch
                    counts = batch.get("request_counts") or {}
                    ids = ",".join(batch.get("ids") or [])
                    done = f"{counts.get('completed', 0)}/{counts.get('total', 0)}"
                    what = f"{name} batch round {batch.get('round')}"
                    lines.line(what, f"{batch.get('status')} {done} {ids}")
                if live:
                    if step not in bars:
                        bars[step] = progress.add_task(name, total=e.data["total"])
                    progress.update(bars[step], completed=e.data["done"])
                elif e.data["done"] >= e.data["total"] and step not in bars:
                    bars[step] = None
                    failed = f", {e.data['failed']} failed" if e.data.get("failed") else ""
                    lines.line(name, f"{e.data['done']}/{e.data['total']}{failed}", "")
            elif e.type == "progress":
                lines.line(e.kind, json.dumps(e.data))
            elif e.type == "output":
                lines.stream(e.data if isinstance(e.data, str) else json.dumps(e.data))
            elif e.type in ("step.retrying", "step.failed"):
                lines.line(e.type, f"{e.step.id}: {e.error.message}", "yellow")
            elif e.type in ("run.started", "run.restarted"):
                lines.line(f"{e.type} (attempt {e.attempt})")
            elif e.type == "input.requested":
                lines.end_stream()
                _ask(progress.console, client, run_id, e)
            elif e.type in WAIT_EVENTS:
                if e.type == "input.received":
                    _Answers.done(e.input_id)
                detail = {k: v for k, v in e.model_dump(mode="json").items() if k in WAIT_DETAIL}
                if detail.get("until"):
                    detail["until"] = _clock(detail["until"])
                lines.line(e.type, json.dumps(detail))
        lines.end_stream()
    run = client.get(run_id)
    if run["status"] == "succeeded":
        out.print_json(json.dumps(run["output"]))
    else:
        err.print(Text(f"run {run['status']}", style="red"), json.dumps(run.get("error")),
                  soft_wrap=True, highlight=False)  # fmt: skip
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


def step_tree(steps: list[dict[str, Any]]) -> list[str]:
    """A run's steps (``GET /v1/runs/{id}/steps``) as the lines of a tree: each step under the
    one that called it, with its status, attempts, time, and cached/reused/error; a map with
    its items counted and its failed items listed (the first few)."""
    children: dict[str, list[dict[str, Any]]] = {}
    ids = {s["id"] for s in steps}
    for s in steps:
        parent = s.get("parent") or ""
        children.setdefault(parent if parent in ids else "", []).append(s)
    lines: list[str] = []

    def walk(parent: str, prefix: str) -> None:
        kids = children.get(parent, [])
        for i, s in enumerate(kids):
            last = i == len(kids) - 1
            lines.append(f"{prefix}{'└─ ' if last else '├─ '}{_step_line(s)}")
            inner = prefix + ("   " if last else "│  ")
            for item in (s.get("failed_items") or [])[:5]:
                error = item["error"]
                lines.append(f"{inner}  item {item['index']} failed: "
                             f"{error['type']}: {error['message']}")  # fmt: skip
            if (s.get("failed") or 0) > 5:
                lines.append(f"{inner}  ... {s['failed'] - 5} more failed items")
            walk(s["id"], inner)

    walk("", "")
    return lines


def _step_line(s: dict[str, Any]) -> str:
    parts = [s["component"], s["status"], s["id"]]
    if s.get("kind") == "map":
        failed = f", {s['failed']} failed" if s.get("failed") else ""
        parts.append(f"{s.get('done', 0)}/{s.get('items', 0)} items{failed}")
    elif s.get("attempts"):
        parts.append(f"{s['attempts']} attempt{'s' if s['attempts'] > 1 else ''}")
    if s.get("started_at") and s.get("finished_at"):
        seconds = _iso(s["finished_at"]) - _iso(s["started_at"])
        parts.append(f"{seconds:.3f}s")
    if s.get("cached"):
        parts.append("cached")
    if s.get("reused"):
        parts.append("reused")
    if s.get("error"):
        parts.append(f"{s['error']['type']}: {s['error']['message']}")
    return "  ".join(parts)


def _iso(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
