"""The ``genx`` command. Each subcommand imports what it needs, so ``genx --help`` stays fast and
``genx gateway`` never imports Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Annotated, Any

import typer

from genx_ray.model import GenxError

GRACEFUL_SHUTDOWN_SECONDS = 5  # a gateway's open event streams, on SIGTERM
DEMO_REVIEW_SECONDS = 60  # how long `genx demo --workflow article` waits for the outline's review

app = typer.Typer(
    name="genx",
    help="genx-ray: durable LLM and agent workflows on Ray, served as REST APIs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
runs_app = typer.Typer(help="Inspect runs through the API (GENX_API_URL, GENX_API_KEY).")
app.add_typer(runs_app, name="runs")
schedules_app = typer.Typer(help="Runs started on a cron, through the API (GENX_API_URL).")
app.add_typer(schedules_app, name="schedules")


@app.command()
def info() -> None:
    """Show the configuration this machine resolves to (Redis, Ray, workflows). Starts nothing."""
    from genx_ray.model import EMBEDDED, Settings
    from genx_ray.store import is_cluster_url, ping

    settings = Settings.current()
    url = settings.redis_url
    if url == EMBEDDED:
        redis = "embedded: a private Redis for each process that starts one (GENX_REDIS_URL)"
    elif (reason := ping(url)) is not None:
        redis = f"{url}: nothing answers ({reason}); " + (
            "set by GENX_REDIS_URL: every command fails"
            if settings.redis_url_explicit
            else "GENX_REDIS_URL unset: genx worker and gateway fail, genx dev and "
            "genx_ray.run/start start a private Redis"
        )
    else:
        kind = "Redis Cluster" if is_cluster_url(url) else "single Redis"
        source = "GENX_REDIS_URL" if settings.redis_url_explicit else "default"
        redis = f"{url} ({kind}; {source})"
    ray = {
        "local": "local: a private Ray for each process that needs one",
        "auto": "auto: joins the running cluster (RAY_ADDRESS, or the one `ray start` started "
        "here), or fails",
    }.get(settings.ray_address, f"{settings.ray_address}: joins that cluster, or fails")
    typer.echo(f"redis:     {redis}")
    typer.echo(f"ray:       {ray}")
    typer.echo(f"workflows: {', '.join(settings.workflows)}")
    typer.echo(f"auth:      {'bearer keys' if settings.api_keys else 'open (single tenant)'}")


@app.command()
def gateway(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """The API plane only: serves every workflow over HTTP. Never imports or connects to Ray."""
    import uvicorn

    from gateway.app import create_app
    from genx_ray.model import Settings
    from genx_ray.store import resolve_redis_url

    settings = Settings.current()
    # The Redis its workers use, or a clear error now (never a private one nobody else sees).
    url = resolve_redis_url(settings, allow_embedded=False)
    app = create_app(settings, redis_url=url)
    # On SIGTERM, open event streams (which never end by themselves) get this long, then are
    # closed: their clients reconnect to another replica and resume after their last event id.
    uvicorn.run(app, host=host, port=port, log_level="warning", lifespan="on",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)  # fmt: skip


@app.command()
def worker(
    address: Annotated[
        str | None, typer.Option(help="Ray cluster: local, auto or host:port.")
    ] = None,
    max_runs: Annotated[
        int | None,
        typer.Option(help="Runs executed at once by this worker [default: what its hosts hold]."),
    ] = None,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds SIGTERM waits for running runs before handing back.")
    ] = 30.0,
    hosts: Annotated[
        str,
        typer.Option(
            help="Where runs execute: 'ray' (run hosts: detached actors, many runs each) or "
            "'inline' (this process; no Ray)."
        ),
    ] = "ray",
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve GET /metrics (Prometheus) on this port [default: off]."),
    ] = None,
) -> None:
    """The compute plane: takes runs from Redis and executes them (steps placed on Ray)."""
    import asyncio
    import logging

    from genx_ray.service import serve_worker
    from genx_ray.store import resolve_redis_url

    if address:
        os.environ["GENX_RAY_ADDRESS"] = address
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The Redis its gateways use, or a clear error now (never a private one nobody else sees).
    url = resolve_redis_url(allow_embedded=False)
    asyncio.run(serve_worker(url, max_runs=max_runs, drain_timeout=drain_timeout, hosts=hosts,
                             metrics_port=metrics_port))  # fmt: skip


@app.command()
def dev(port: Annotated[int, typer.Option(help="Gateway port.")] = 8000) -> None:
    """The whole stack in one process tree: Redis (embedded if none answers), the LLM simulator
    (unless OPENAI_BASE_URL is set), a worker and the gateway."""
    from genx_ray.store import free_port, resolve_redis_url

    # A private Redis if none answers (and GENX_REDIS_URL is unset); exported as GENX_REDIS_URL
    # for the worker and gateway started below, which then never start one of their own.
    url = resolve_redis_url(allow_embedded=True)
    cli = [sys.executable, "-m", "genx_ray.cli"]
    children: list[subprocess.Popen[bytes]] = []
    llm = os.environ.get("OPENAI_BASE_URL")
    if not llm:
        sim_port = free_port()
        children.append(subprocess.Popen([*cli, "sim", "--port", str(sim_port)]))
        llm = os.environ["OPENAI_BASE_URL"] = f"http://127.0.0.1:{sim_port}/v1"
        os.environ.setdefault("OPENAI_API_KEY", "genx-sim")
    typer.echo(f"genx dev: redis {url}; LLM {llm}; API on http://127.0.0.1:{port}", err=True)
    children.append(subprocess.Popen([*cli, "worker"]))
    children.append(subprocess.Popen([*cli, "gateway", "--port", str(port)]))

    def stop(*_: Any) -> None:
        for proc in children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while all(p.poll() is None for p in children):
            time.sleep(0.2)
    finally:
        stop()
        for proc in children:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()


@app.command()
def sim(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8100,
    latency_ms: Annotated[float, typer.Option(help="Mean latency of a call.")] = 100.0,
    jitter_ms: Annotated[float, typer.Option(help="Standard deviation of the latency.")] = 0.0,
    max_concurrency: Annotated[
        int | None, typer.Option(help="Concurrent calls past this get 429 + Retry-After.")
    ] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute past this get 429.")] = None,
    error_rate: Annotated[float, typer.Option(help="Fraction of calls answered 500.")] = 0.0,
    batches: Annotated[
        bool, typer.Option(help="Serve the Batch API (/v1/files, /v1/batches); off: 404.")
    ] = True,
    batch_delay_ms: Annotated[float, typer.Option(help="A batch's time in progress.")] = 500.0,
) -> None:
    """An OpenAI-compatible LLM simulator (chat with streaming, embeddings, models, the Batch API,
    /sim/stats)."""
    import uvicorn

    from genx_ray.llm.sim import SimConfig, create_sim

    config = SimConfig(
        latency_ms=latency_ms, jitter_ms=jitter_ms, max_concurrency=max_concurrency, rpm=rpm,
        error_rate=error_rate, batches=batches, batch_delay_ms=batch_delay_ms,
    )  # fmt: skip
    uvicorn.run(create_sim(config), host=host, port=port, log_level="warning")


@app.command("run")
def run_cmd(
    workflow: Annotated[str, typer.Argument(help="Workflow name (see GET /v1/workflows).")],
    input: Annotated[str, typer.Option("--input", help="The run's input, as JSON.")] = "null",
    detach: Annotated[bool, typer.Option(help="Print the run and return at once.")] = False,
    delay: Annotated[
        float | None, typer.Option(help="Start it this many seconds from now.")
    ] = None,
    start_at: Annotated[str | None, typer.Option(help="Start it at this time (RFC 3339).")] = None,
    tag: Annotated[
        list[str] | None, typer.Option(help="A tag key:value to find it by (repeat for more).")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="1 (most urgent) .. 5 [default: 3].")] = None,
) -> None:
    """Start a run through the API; follow it with live progress and print its output."""
    from genx_ray.cli._console import follow
    from genx_ray.client import Client

    client = Client()
    run = client.start(
        workflow, _json_option("--input", input), delay_seconds=delay, start_at=start_at,
        tags=_tags(tag), priority=priority,
    )  # fmt: skip
    if detach:
        typer.echo(json.dumps(run, indent=2))
        return
    typer.echo(f"run {run['id']}", err=True)
    typer.echo(f"viewer: {client.viewer_url(run)}", err=True)
    raise typer.Exit(0 if follow(client, run["id"]) == "succeeded" else 1)


@app.command()
def demo(
    workflow: Annotated[str, typer.Option(help="Example workflow to run.")] = "onboard",
    input: Annotated[str, typer.Option("--input", help="Its input, as JSON.")] = "{}",
) -> None:
    """The main job: the whole stack, an example run through the API with live progress."""
    import httpx

    from genx_ray.cli._console import follow
    from genx_ray.client import Client
    from genx_ray.store import free_port

    port = free_port()
    # The stack's own output (Ray's, the worker's and the servers' logs) is diagnostics: it goes
    # to a log file, said once, and shown when the stack fails. The terminal carries the run
    # (stderr) and its report (stdout, alone: it can be piped).
    fd, log_path = tempfile.mkstemp(prefix="genx-demo-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        stack = subprocess.Popen(
            [sys.executable, "-m", "genx_ray.cli", "dev", "--port", str(port)],
            start_new_session=True, stdout=log, stderr=log,
        )  # fmt: skip
    typer.echo(f"the stack's log (Redis, Ray, worker, gateway): {log_path}", err=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if stack.poll() is not None:
                raise GenxError(f"the stack exited before it was ready:\n{_tail(log_path)}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise GenxError(f"the stack did not become ready in 120 s:\n{_tail(log_path)}")
            time.sleep(0.3)
        client = Client(base)
        payload = _json_option("--input", input)
        if workflow == "article" and isinstance(payload, dict):
            # The article waits for a person to approve the outline: the demo shows how to
            # answer (here on stdin, with the CLI or with curl), and writes the draft outline
            # if nobody does within the minute.
            payload.setdefault("review_seconds", DEMO_REVIEW_SECONDS)
        run = client.start(workflow, payload)
        typer.echo(f"run {run['id']} ({workflow}) via {base}", err=True)
        typer.echo(f"viewer: {client.viewer_url(run)}", err=True)
        status = follow(client, run["id"])
    finally:
        os.killpg(stack.pid, signal.SIGTERM)
        try:
            stack.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)
    raise typer.Exit(0 if status == "succeeded" else 1)


WorkflowOpt = Annotated[str | None, typer.Option(help="Only runs of this workflow.")]
StatusOpt = Annotated[str | None, typer.Option(help="Only runs with this status.")]
TagOpt = Annotated[
    list[str] | None, typer.Option(help="Only runs tagged key:value (repeat: every one).")
]
AfterOpt = Annotated[str | None, typer.Option(help="Only runs created then or later (RFC 3339).")]
BeforeOpt = Annotated[str | None, typer.Option(help="Only runs created before (RFC 3339).")]


@runs_app.command("ls")
def runs_ls(
    workflow: WorkflowOpt = None,
    status: StatusOpt = None,
    tag: TagOpt = None,
    created_after: AfterOpt = None,
    created_before: BeforeOpt = None,
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
) -> None:
    """List runs, newest first."""
    from rich.console import Console
    from rich.table import Table

    from genx_ray.client import Client

    page = Client().list(
        workflow=workflow, status=status, tag=tag or None, created_after=created_after,
        created_before=created_before, limit=limit,
    )  # fmt: skip
    rows: list[tuple[str, ...]] = [
        (r["id"], r["workflow"], r["status"], str(r["attempt"]), r["created_at"],
         ",".join(f"{k}:{v}" for k, v in (r.get("tags") or {}).items()))
        for r in page["runs"]
    ]  # fmt: skip
    columns = ["workflow", "status", "attempt", "created", "tags"]
    if status == "queued":  # what decides which starts first
        columns.append("priority")
        rows = [(*row, str(r.get("priority", 3))) for row, r in zip(rows, page["runs"],
                                                                     strict=True)]  # fmt: skip
    if not sys.stdout.isatty():  # piped: one tab-separated line a run, nothing truncated
        for row in rows:
            typer.echo("\t".join(row))
        return
    table = Table()
    table.add_column("id", no_wrap=True, min_width=30)
    for name in columns:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@runs_app.command("steps")
def runs_steps(run_id: Annotated[str, typer.Argument(help="The run.")]) -> None:
    """A run's steps as a tree.

    In the order its code called them: status, attempts, time, cached or reused, error; a map
    as one line counting its items."""
    from genx_ray.cli._console import step_tree
    from genx_ray.client import Client

    for line in step_tree(Client().steps(run_id)):
        typer.echo(line)


@runs_app.command("rerun")
def runs_rerun(
    run_id: Annotated[str, typer.Argument(help="The run to run again (one that ended).")],
    from_step: Annotated[
        str | None,
        typer.Option(help="Reuse the steps it completed before this one (see `genx runs steps`)."),
    ] = None,
    input: Annotated[
        str | None, typer.Option("--input", help="A new input, as JSON [default: the run's].")
    ] = None,
    detach: Annotated[bool, typer.Option(help="Print the new run and return at once.")] = False,
) -> None:
    """Run a run again, as a new run, from the start or from a step.

    The run itself is left as it was. From a step, the new run reuses what the run completed
    before that step (a map: only its failed items run again)."""
    from genx_ray.cli._console import follow
    from genx_ray.client import Client

    client = Client()
    payload = None if input is None else _json_option("--input", input)
    run = client.rerun(run_id, from_step=from_step, input=payload)
    if detach:
        typer.echo(json.dumps(run, indent=2))
        return
    typer.echo(f"run {run['id']} (a rerun of {run_id})", err=True)
    typer.echo(f"viewer: {client.viewer_url(run)}", err=True)
    raise typer.Exit(0 if follow(client, run["id"]) == "succeeded" else 1)


@runs_app.command("cancel")
def runs_cancel(
    run_id: Annotated[str | None, typer.Argument(help="One run [default: those filtered].")] = None,
    workflow: WorkflowOpt = None,
    status: StatusOpt = None,
    tag: TagOpt = None,
    created_after: AfterOpt = None,
    created_before: BeforeOpt = None,
    dry_run: Annotated[
        bool, typer.Option(help="Say what would be cancelled; change nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Cancel a run, or every run the filters choose.

    With filters, it says how many runs match and asks before cancelling (--yes: it does not
    ask; --dry-run: it only says)."""
    from genx_ray.client import Client

    client = Client()
    if run_id is not None:
        run = client.cancel(run_id)
        typer.echo(f"run {run['id']} {run['status']}")
        return
    found = {
        "workflow": workflow, "status": status, "tag": tag or None,
        "created_after": created_after, "created_before": created_before,
    }  # fmt: skip
    found = {k: v for k, v in found.items() if v is not None}
    if not found:
        raise typer.BadParameter("name a run, or filter: --workflow, --status, --tag, --created-*")
    preview = client.bulk("cancel", found, dry_run=True)
    live = [r for r in preview["runs"] if r["status"] not in ("succeeded", "failed", "cancelled")]
    typer.echo(f"{preview['matched']} run(s) match, {len(live)} not ended", err=True)
    if dry_run or not live:
        for r in preview["runs"]:
            typer.echo(f"{r['id']}\t{r['status']}")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise typer.BadParameter(
                "cancelling many runs needs --yes when not asked in a terminal"
            )
        typer.confirm(f"cancel {len(live)} run(s)?", abort=True, err=True)
    done = client.bulk("cancel", found, key=f"cli-{os.getpid()}-{time.time_ns()}")
    for r in done["runs"]:
        typer.echo(f"{r['id']}\t{r['status']}")
    typer.echo(f"{done['done']} run(s) cancelled or asked to stop", err=True)


@runs_app.command("tail")
def runs_tail(
    run_id: Annotated[str, typer.Argument(help="The run to follow.")],
    after: Annotated[str | None, typer.Option(help="Start after this event id.")] = None,
) -> None:
    """Follow a run's events (from the beginning, or after an event id) until it ends."""
    from genx_ray.client import Client
    from genx_ray.model import dump_event

    for entry in Client().events(run_id, after):
        typer.echo(f"{entry.id} {entry.event.type} {dump_event(entry.event)}")


@runs_app.command("input")
def runs_input(
    run_id: Annotated[str, typer.Argument(help="The run waiting for input.")],
    data: Annotated[str, typer.Option("--data", help="The input, as JSON.")],
    input_id: Annotated[
        str | None, typer.Option(help="Answer only this request (its input.requested input_id).")
    ] = None,
) -> None:
    """Answer a run waiting in wait_for_input; it carries on with the input."""
    from genx_ray.client import Client

    run = Client().send_input(run_id, _json_option("--data", data), input_id)
    typer.echo(f"run {run['id']} {run['status']}")


@schedules_app.command("add")
def schedules_add(
    workflow: Annotated[str, typer.Argument(help="The workflow to start.")],
    cron: Annotated[str, typer.Option(help="When, as cron: '*/5 * * * *' (a 6th field: seconds).")],
    input: Annotated[str, typer.Option("--input", help="Each run's input, as JSON.")] = "null",
    timezone: Annotated[str, typer.Option(help="The cron's time zone.")] = "UTC",
    overlap: Annotated[
        str, typer.Option(help="skip: no run while the previous one is open; allow: always.")
    ] = "skip",
) -> None:
    """Start a run of WORKFLOW at each tick of a cron expression."""
    from genx_ray.client import Client

    schedule = Client().create_schedule(
        workflow, cron, _json_option("--input", input), timezone, overlap=overlap
    )
    typer.echo(json.dumps(schedule, indent=2))


@schedules_app.command("ls")
def schedules_ls() -> None:
    """The schedules: id, workflow, cron, time zone, next run (or why it is disabled), paused."""
    from genx_ray.client import Client

    for s in Client().schedules():
        paused = "paused" if s.get("paused") else ""
        when = f"disabled: {s['disabled']}" if s.get("disabled") else str(s["next_run_at"])
        row = [s["id"], s["workflow"], s["cron"], s["timezone"], when, paused]
        typer.echo("\t".join(row).rstrip("\t"))


@schedules_app.command("pause")
def schedules_pause(schedule_id: Annotated[str, typer.Argument(help="The schedule.")]) -> None:
    """Pause a schedule: its ticks start no run until it is resumed."""
    from genx_ray.client import Client

    Client().pause_schedule(schedule_id)


@schedules_app.command("resume")
def schedules_resume(schedule_id: Annotated[str, typer.Argument(help="The schedule.")]) -> None:
    """Resume a paused schedule, from its next tick."""
    from genx_ray.client import Client

    Client().pause_schedule(schedule_id, paused=False)


@schedules_app.command("rm")
def schedules_rm(schedule_id: Annotated[str, typer.Argument(help="The schedule.")]) -> None:
    """Delete a schedule: no more runs start from it (runs it started go on)."""
    from genx_ray.client import Client

    Client().delete_schedule(schedule_id)


def _tags(values: list[str] | None) -> dict[str, str] | None:
    """``--tag key:value`` options as a run's tags."""
    tags: dict[str, str] = {}
    for value in values or []:
        key, sep, val = value.partition(":")
        if not sep or not key:
            raise typer.BadParameter(f"--tag {value!r}: expected key:value")
        tags[key] = val
    return tags or None


def _tail(path: str, lines: int = 30) -> str:
    """The end of a log file, to show what went wrong."""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _json_option(name: str, value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{name} is not JSON: {exc}") from None


def main() -> None:
    try:
        app()
    except GenxError as exc:
        typer.secho(f"genx: {exc}", err=True, fg=typer.colors.RED)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
