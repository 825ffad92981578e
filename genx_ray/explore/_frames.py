"""Runs as data, for notebooks: runs, events, step attempts, map progress and LLM usage as pandas
data frames; a run's timeline as a matplotlib figure; a live progress bar for a run.

How it works: everything is read straight from Redis with a synchronous client, the way the
gateway reads it. Runs and their usage come from the tenant's run index
(:func:`genx_ray.store.keys.run_index`, newest first, like ``GET /v1/runs``) and each run's record;
events, step attempts and map progress come from the run's event stream (``XRANGE`` in pages).
Step attempts are rebuilt from the step events alone, as the API's steps view does
(:func:`genx_ray.model.step_attempts`). Nothing here writes and nothing needs the process that
executes the run, so it works on finished and running runs alike, from any machine that reaches
the Redis; a frame of a running run is a snapshot (call again for news).

Use the functions (``runs_frame(...)``, each taking ``redis_url=`` and, for listings,
``tenant=``), or an :class:`Explorer` holding one connection for many calls. Redis is
``redis_url``, else what :func:`genx_ray.store._connections.resolve_redis_url` resolves
(``GENX_REDIS_URL``, the one a ``genx_ray.start`` of this process uses).

What must stay true:

- ``import genx_ray`` never imports this module, pandas or matplotlib, and this module never
  imports Ray: workers and the gateway do not carry the ``notebook`` extra. Without pandas,
  importing this module is an ImportError naming the command that installs it.
- Only what the stream and the run record say is shown. Map items are quiet (no events of their
  own): only their retried and failed attempts appear, without a start time. LLM usage totals
  come from the run record, which is authoritative; nothing records usage per model (the
  ``llm.usage`` events carry one process's running totals, all models together).
- ``timeline`` draws exactly one bar per step attempt that has a start (every row of
  :meth:`Explorer.steps_frame` but map items), on the figure's first axes, so its bars can be
  counted against the frame.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast

try:
    import pandas as pd
    from matplotlib.figure import Figure
except ImportError as exc:  # pragma: no cover - what a user without the extra sees
    raise ImportError(
        "genx_ray.explore needs pandas and matplotlib (the 'notebook' extra): from a clone of "
        "genx-ray run `.venv/bin/pip install -e '.[notebook]'`"
    ) from exc

from genx_ray.explore._views import ProgressView, draw, event_ts, timestamp, typed
from genx_ray.model import (
    DEFAULT_TENANT,
    RUN_PREFIX,
    MapProgress,
    ProgressEvent,
    Run,
    RunNotFound,
    RunStatus,
    UserError,
    new_run_id,
    step_attempts,
)
from genx_ray.store import (
    START,
    StreamEntry,
    follow_sync,
    keys,
    parse_entries,
    resolve_redis_url,
    sync_redis,
)

if TYPE_CHECKING:
    from genx_ray.service import RunHandle

__all__ = [
    "Explorer",
    "events_frame",
    "map_progress_frame",
    "runs_frame",
    "steps_frame",
    "timeline",
    "usage_frame",
    "watch",
]

PAGE = 500  # run ids per index read (each page is one pipelined HGETALL round trip)
EVENTS_PAGE = 5000  # stream entries per XRANGE
# A run id starts with its creation time (ms), written a moment before the record's created_at
# (an idempotent start makes the id before it takes the key): the index scan for ``since``
# starts this much earlier, and created_at decides.
SINCE_SLACK = 60.0
_ID_TIME_CHARS = len(RUN_PREFIX) + 10  # "run_" + the 48-bit ms timestamp in base32

Since = datetime | timedelta | float | str

RUN_COLUMNS = [
    "run_id", "workflow", "status", "created_at", "started_at", "finished_at", "queued_s",
    "duration_s", "attempt", "tenant", "error_type", "error", "llm_calls", "prompt_tokens",
    "completion_tokens", "llm_retries", "cost_usd", "input",
]  # fmt: skip
EVENT_COLUMNS = [
    "run_id", "id", "ts", "elapsed_s", "type", "step_id", "step_name", "step_attempt", "kind",
    "data",
]  # fmt: skip
STEP_COLUMNS = [
    "run_id", "step_id", "name", "kind", "parent", "attempt", "status", "start", "end",
    "duration_s", "retries", "cached", "replayed", "error_type", "error", "run_attempt", "reused",
]  # fmt: skip
MAP_COLUMNS = [
    "run_id", "step_id", "name", "ts", "elapsed_s", "done", "failed", "total", "rate", "eta",
]  # fmt: skip
USAGE_FIELDS = [
    "calls",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "retries",
    "cost_usd",
]


class Explorer:
    """One Redis connection for many reads: the same functions as the module's, as methods.

    ``tenant`` scopes the listings (:meth:`runs_frame`, :meth:`usage_frame`); a run id reaches
    its run whatever its tenant (whoever reaches Redis reads every run). Use it as a context
    manager, or :meth:`close` it.
    """

    def __init__(self, redis_url: str | None = None, *, tenant: str = DEFAULT_TENANT) -> None:
        self.redis_url = redis_url or resolve_redis_url()
        self.tenant = tenant
        self.redis = sync_redis(self.redis_url)

    def __enter__(self) -> Explorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.redis.close()

    # -- runs ----------------------------------------------------------------------------------

    def run(self, run_id: str) -> Run:
        """The run's record; :class:`RunNotFound` if there is none (or it expired)."""
        h = cast(dict[str, str], self.redis.hgetall(keys.run(run_id)))
        if not h:
            raise RunNotFound(run_id)
        return Run.from_hash(h)

    def runs(
        self,
        workflow: str | None = None,
        status: str | Iterable[str] | None = None,
        since: Since | None = None,
        *,
        limit: int | None = 1000,
    ) -> list[Run]:
        """The tenant's runs, newest first, filtered; at most ``limit`` (None: all).

        ``status`` is one status or several; ``since`` a datetime (naive ones are local time,
        as Python reads them), an ISO string, unix seconds, or a timedelta meaning "in the last".
        """
        wanted = _statuses(status)
        after = _since(since)
        index = keys.run_index(self.tenant, workflow)
        low = "-" if after is None else "[" + new_run_id(after - SINCE_SLACK)[:_ID_TIME_CHARS]
        upper, out = "+", cast(list[Run], [])
        while limit is None or len(out) < limit:
            ids = cast(list[str], self.redis.zrevrangebylex(index, upper, low, start=0, num=PAGE))
            if not ids:
                break
            with self.redis.pipeline(transaction=False) as pipe:
                for run_id in ids:
                    pipe.hgetall(keys.run(run_id))
                hashes = cast(list[dict[str, str]], pipe.execute())
            for h in hashes:
                # An empty hash expired after its retention (the supervisor trims the index);
                # the tenant is checked again, as the API does: the index decides nothing alone.
                if not h or h.get("tenant", DEFAULT_TENANT) != self.tenant:
                    continue
                if workflow is not None and h["workflow"] != workflow:
                    continue
                if wanted and h["status"] not in wanted:
                    continue
                if after is not None and float(h.get("created_at") or 0) < after:
                    continue
                out.append(Run.from_hash(h))
                if limit is not None and len(out) == limit:
                    break
            upper = f"({ids[-1]}"
        return out

    def runs_frame(
        self,
        workflow: str | None = None,
        status: str | Iterable[str] | None = None,
        since: Since | None = None,
        *,
        limit: int | None = 1000,
    ) -> pd.DataFrame:
        """The tenant's runs, newest first, one row each (filters as :meth:`runs`).

        Columns: ``run_id``, ``workflow``, ``status``, ``created_at``, ``started_at``,
        ``finished_at`` (UTC timestamps), ``queued_s`` (created to started), ``duration_s``
        (started to finished, or to now while it runs), ``attempt``, ``tenant``, ``error_type``,
        ``error``, and its LLM usage: ``llm_calls``, ``prompt_tokens``, ``completion_tokens``,
        ``llm_retries``, ``cost_usd`` (0 for a run without LLM calls); ``input`` (the run's
        input, decoded: group by its fields, e.g. ``frame["input"].str.get("model")``).
        """
        now = time.time()
        rows = []
        for run in self.runs(workflow, status, since, limit=limit):
            created, started = run.created_at.timestamp(), timestamp(run.started_at)
            finished = timestamp(run.finished_at)
            usage = run.usage or {}
            rows.append({
                "run_id": run.id, "workflow": run.workflow, "status": run.status.value,
                "created_at": created, "started_at": started, "finished_at": finished,
                "queued_s": None if started is None else started - created,
                "duration_s": None if started is None else (finished or now) - started,
                "attempt": run.attempt, "tenant": run.tenant,
                "error_type": run.error.type if run.error else None,
                "error": run.error.message if run.error else None,
                "llm_calls": int(usage.get("calls", 0)),
                "prompt_tokens": int(usage.get("prompt_tokens", 0)),
                "completion_tokens": int(usage.get("completion_tokens", 0)),
                "llm_retries": int(usage.get("retries", 0)),
                "cost_usd": float(usage.get("cost_usd", 0.0)), "input": run.input,
            })  # fmt: skip
        frame = pd.DataFrame(rows, columns=RUN_COLUMNS)
        return _datetimes(frame, "created_at", "started_at", "finished_at")

    def usage_frame(
        self,
        workflow: str | None = None,
        status: str | Iterable[str] | None = None,
        since: Since | None = None,
        *,
        by: Literal["run", "workflow", "model"] = "run",
        limit: int | None = 1000,
    ) -> pd.DataFrame:
        """LLM usage of the tenant's runs that made LLM calls (filters as :meth:`runs`), from
        the run records, which are authoritative (and live: a running run's calls are counted
        as they end).

        ``by="run"``: one row per run, newest first: ``run_id``, ``workflow``, ``status``,
        ``created_at``, then ``calls``, ``prompt_tokens``, ``completion_tokens``,
        ``total_tokens``, ``retries``, ``cost_usd`` (an estimate from public prices).
        ``by="workflow"``: one row per workflow, costliest first: ``workflow``, ``runs``, then
        the same sums. ``by="model"``: one row per model and workflow, costliest first:
        ``model``, ``workflow``, ``runs``, ``calls``, ``prompt_tokens``,
        ``completion_tokens``, ``total_tokens``, ``cost_usd`` (retries are counted per run,
        not per model).
        """
        if by not in ("run", "workflow", "model"):
            raise UserError(f"usage_frame(by={by!r}): 'run', 'workflow' or 'model'")
        if by == "model":
            return self._usage_by_model(workflow, status, since, limit)
        rows = []
        for run in self.runs(workflow, status, since, limit=limit):
            if not run.usage:
                continue
            u = run.usage
            rows.append({
                "run_id": run.id, "workflow": run.workflow, "status": run.status.value,
                "created_at": run.created_at.timestamp(), "calls": int(u.get("calls", 0)),
                "prompt_tokens": int(u.get("prompt_tokens", 0)),
                "completion_tokens": int(u.get("completion_tokens", 0)),
                "total_tokens": int(u.get("prompt_tokens", 0) + u.get("completion_tokens", 0)),
                "retries": int(u.get("retries", 0)), "cost_usd": float(u.get("cost_usd", 0.0)),
            })  # fmt: skip
        frame = pd.DataFrame(
            rows, columns=["run_id", "workflow", "status", "created_at", *USAGE_FIELDS]
        )
        frame = _datetimes(frame, "created_at")
        if by == "run":
            return frame
        grouped = frame.groupby("workflow", sort=False)
        totals = grouped[USAGE_FIELDS].sum()
        totals.insert(0, "runs", grouped.size())
        return totals.sort_values("cost_usd", ascending=False).reset_index()

    def _usage_by_model(
        self,
        workflow: str | None,
        status: str | Iterable[str] | None,
        since: Since | None,
        limit: int | None,
    ) -> pd.DataFrame:
        rows = []
        for run in self.runs(workflow, status, since, limit=limit):
            for model, u in (run.usage_by_model or {}).items():
                prompt, completion = (
                    int(u.get("prompt_tokens", 0)),
                    int(u.get("completion_tokens", 0)),
                )
                rows.append({
                    "model": model, "workflow": run.workflow, "run_id": run.id,
                    "calls": int(u.get("calls", 0)), "prompt_tokens": prompt,
                    "completion_tokens": completion, "total_tokens": prompt + completion,
                    "cost_usd": float(u.get("cost_usd", 0.0)),
                })  # fmt: skip
        sums = ["calls", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd"]
        frame = pd.DataFrame(rows, columns=["model", "workflow", "run_id", *sums])
        grouped = frame.groupby(["model", "workflow"], sort=False)
        totals = grouped[sums].sum()
        totals.insert(0, "runs", grouped["run_id"].nunique())
        return totals.sort_values("cost_usd", ascending=False).reset_index()

    # -- one run's stream ----------------------------------------------------------------------

    def entries(self, run_id: str) -> list[StreamEntry]:
        """Every event of the run as stored, oldest first; :class:`RunNotFound` if it has none
        and no record."""
        stream, after, out = keys.events(run_id), START, []
        while True:
            raw = cast(Any, self.redis.xrange(stream, f"({after}", "+", count=EVENTS_PAGE))
            page = parse_entries(raw)
            out += page
            if len(page) < EVENTS_PAGE:
                break
            after = page[-1].id
        if not out and not self.redis.exists(keys.run(run_id)):
            raise RunNotFound(run_id)
        return out

    def events_frame(self, run_id: str) -> pd.DataFrame:
        """The run's events, one row per stream entry, in stream order.

        Columns: ``run_id``, ``id`` (the stream entry id, which is the SSE id), ``ts`` (UTC),
        ``elapsed_s`` (since the run's first event), ``type``, ``step_id``, ``step_name``,
        ``step_attempt`` (step events), ``kind`` (``progress``), ``data``: the ``data`` of a
        ``progress`` or ``output`` event, else a dict of the event's other fields (``error``,
        ``delay``, ``cached``, ``output``...), None when it has none.
        """
        rows, first = [], None
        for entry in self.entries(run_id):
            # Raw JSON, not the typed union: a type a newer version added still gets its row.
            fields: dict[str, Any] = json.loads(entry.data)
            ts = float(fields.pop("ts", 0.0))
            first = ts if first is None else first
            step = fields.pop("step", None) or {}
            fields.pop("type", None)
            fields.pop("run_id", None)
            kind = fields.pop("kind", None)
            data = fields.get("data") if entry.type in ("progress", "output") else fields or None
            rows.append({
                "run_id": run_id, "id": entry.id, "ts": ts, "elapsed_s": ts - first,
                "type": entry.type, "step_id": step.get("id"), "step_name": step.get("name"),
                "step_attempt": step.get("attempt"), "kind": kind, "data": data,
            })  # fmt: skip
        frame = pd.DataFrame(rows, columns=EVENT_COLUMNS)
        frame["step_attempt"] = frame["step_attempt"].astype("Int64")
        return _datetimes(frame, "ts")

    def steps_frame(self, run_id: str) -> pd.DataFrame:
        """The run's step attempts, one row each, in the order they started.

        Columns: ``run_id``, ``step_id``, ``name`` (the component), ``kind`` (``step``, ``map``
        for a ``Component.map`` as a whole, ``item`` for one of its items), ``parent`` (the
        enclosing step's id, "" at the top), ``attempt`` (1, 2... within the run's attempt),
        ``status``, ``start``, ``end`` (UTC; NaT if not recorded or not over), ``duration_s``,
        ``retries`` (the step's retries so far: the same on each of its rows), ``cached`` (a
        cache hit: no attempt ran), ``replayed`` (from the journal of an earlier run attempt),
        ``error_type``, ``error``, ``run_attempt``, ``reused`` (a rerun's step taken from the
        journal of the run it reruns).

        ``status``: ``running``, ``succeeded``, ``retried`` (failed, and another attempt
        followed), ``failed``, ``interrupted`` (the run attempt stopped under it: a lost host,
        a drain) or ``cancelled``. A retried attempt's successor starts when its backoff ends.
        Map items are quiet: only their retried and failed attempts appear, with no start.
        """
        return self._steps(run_id, self.entries(run_id))

    def map_progress_frame(self, run_id: str) -> pd.DataFrame:
        """The run's map progress (``progress`` events of kind ``map``), one row per event.

        Columns: ``run_id``, ``step_id`` (the map's step), ``name``, ``ts`` (UTC),
        ``elapsed_s`` (since the run's first event), ``done`` (failed items included),
        ``failed``, ``total``, ``rate`` (items per second), ``eta`` (seconds left).
        """
        return self._maps(run_id, self.entries(run_id))

    def timeline(self, run_id: str) -> Figure:
        """A Gantt chart of the run's step attempts, one bar per attempt colored by its status,
        over seconds since the run was created; under it, when the run has maps, each map's
        items done over time. A running run is drawn up to now, its open attempts in blue.

        Returns a matplotlib :class:`~matplotlib.figure.Figure` (a notebook shows it as a PNG);
        its first axes holds exactly one bar per attempt with a start (map items have none).
        """
        run = self.run(run_id)
        entries = self.entries(run_id)
        return draw(run, self._steps(run_id, entries), self._maps(run_id, entries))

    # -- following a run -----------------------------------------------------------------------

    def follow(self, run_id: str, after: str = START) -> Iterator[StreamEntry]:
        """The run's events after ``after``, then live ones until its terminal event."""
        return follow_sync(self.redis, run_id, after)

    def watch(self, run: str | RunHandle) -> Run:
        """Follow a run until it ends, showing its status and a progress bar per map: in a
        notebook one display, updated in place; elsewhere a line per change. Returns the run
        as it ended."""
        run_id = run if isinstance(run, str) else run.id
        view = ProgressView(run_id)
        for entry in self.follow(run_id):
            view.add(entry)
        final = self.run(run_id)
        view.finish(final)
        return final

    # -- building the frames -------------------------------------------------------------------

    def _steps(self, run_id: str, entries: list[StreamEntry]) -> pd.DataFrame:
        # The shared reading of step events (genx_ray.model: the API's steps view uses it too).
        rows = step_attempts(typed(e) for e in entries if e.type.startswith(("step.", "run.")))
        retries: dict[str, int] = {}
        for row in rows:
            retries[row["step_id"]] = max(retries.get(row["step_id"], 0), row["attempt"] - 1)
        for row in rows:
            row["run_id"] = run_id
            row["retries"] = retries[row["step_id"]]
            start, end = row["start"], row["end"]
            row["duration_s"] = None if start is None or end is None else max(0.0, end - start)
        frame = pd.DataFrame(rows, columns=STEP_COLUMNS)
        for name in ("attempt", "retries", "run_attempt"):
            frame[name] = frame[name].astype("int64")
        for name in ("cached", "replayed", "reused"):
            frame[name] = frame[name].astype(bool)
        frame["duration_s"] = frame["duration_s"].astype("float64")
        return _datetimes(frame, "start", "end")

    def _maps(self, run_id: str, entries: list[StreamEntry]) -> pd.DataFrame:
        first = event_ts(entries[0]) if entries else None
        rows = []
        for entry in entries:
            event = typed(entry) if entry.type == "progress" else None
            if not isinstance(event, ProgressEvent) or event.kind != "map":
                continue
            p = MapProgress.model_validate(event.data)
            rows.append({
                "run_id": run_id, "step_id": p.step, "name": event.step.name if event.step else "",
                "ts": event.ts, "elapsed_s": event.ts - (first or event.ts), "done": p.done,
                "failed": p.failed, "total": p.total, "rate": p.rate, "eta": p.eta,
            })  # fmt: skip
        return _datetimes(pd.DataFrame(rows, columns=MAP_COLUMNS), "ts")


# -- small conversions -------------------------------------------------------------------------


def _statuses(status: str | Iterable[str] | None) -> set[str]:
    if status is None:
        return set()
    values = [status] if isinstance(status, str) else list(status)
    try:
        return {RunStatus(v).value for v in values}
    except ValueError:
        known = ", ".join(s.value for s in RunStatus)
        raise UserError(f"status {values!r}: each one of {known}") from None


def _since(since: Since | None) -> float | None:
    if since is None:
        return None
    if isinstance(since, timedelta):
        return time.time() - since.total_seconds()
    if isinstance(since, datetime):  # a pandas Timestamp too
        return since.timestamp()
    if isinstance(since, str):
        try:
            return datetime.fromisoformat(since).timestamp()
        except ValueError:
            raise UserError(f"since={since!r}: not an ISO date or datetime") from None
    return float(since)


def _datetimes(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """Unix seconds (or None) to UTC timestamps (or NaT)."""
    for name in columns:
        frame[name] = pd.to_datetime(frame[name].astype("float64"), unit="s", utc=True)
    return frame


# -- the same, one call each -------------------------------------------------------------------


def runs_frame(
    workflow: str | None = None,
    status: str | Iterable[str] | None = None,
    since: Since | None = None,
    *,
    limit: int | None = 1000,
    tenant: str = DEFAULT_TENANT,
    redis_url: str | None = None,
) -> pd.DataFrame:
    """The tenant's runs, newest first: see :meth:`Explorer.runs_frame`."""
    with Explorer(redis_url, tenant=tenant) as ex:
        return ex.runs_frame(workflow, status, since, limit=limit)


def usage_frame(
    workflow: str | None = None,
    status: str | Iterable[str] | None = None,
    since: Since | None = None,
    *,
    by: Literal["run", "workflow", "model"] = "run",
    limit: int | None = 1000,
    tenant: str = DEFAULT_TENANT,
    redis_url: str | None = None,
) -> pd.DataFrame:
    """LLM calls, tokens and cost by run, workflow or model: see :meth:`Explorer.usage_frame`."""
    with Explorer(redis_url, tenant=tenant) as ex:
        return ex.usage_frame(workflow, status, since, by=by, limit=limit)


def events_frame(run_id: str, *, redis_url: str | None = None) -> pd.DataFrame:
    """The run's events, one row per stream entry: see :meth:`Explorer.events_frame`."""
    with Explorer(redis_url) as ex:
        return ex.events_frame(run_id)


def steps_frame(run_id: str, *, redis_url: str | None = None) -> pd.DataFrame:
    """The run's step attempts, one row each: see :meth:`Explorer.steps_frame`."""
    with Explorer(redis_url) as ex:
        return ex.steps_frame(run_id)


def map_progress_frame(run_id: str, *, redis_url: str | None = None) -> pd.DataFrame:
    """The run's map progress events: see :meth:`Explorer.map_progress_frame`."""
    with Explorer(redis_url) as ex:
        return ex.map_progress_frame(run_id)


def timeline(run_id: str, *, redis_url: str | None = None) -> Figure:
    """A Gantt chart of the run's step attempts and its maps' progress: see
    :meth:`Explorer.timeline`."""
    with Explorer(redis_url) as ex:
        return ex.timeline(run_id)


def watch(run: str | RunHandle, *, redis_url: str | None = None) -> Run:
    """Follow a run with a live progress bar until it ends: see :meth:`Explorer.watch`."""
    with Explorer(redis_url) as ex:
        return ex.watch(run)
