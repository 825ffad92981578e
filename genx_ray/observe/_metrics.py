"""Metrics: Prometheus counters and histograms of what runs do, in the text exposition format on
``GET /metrics`` (the gateway's, and the worker's with ``genx worker --metrics-port``).

Every process records into its own registry, where the thing happens: the gateway counts the
runs it creates and the events it streams; a run host counts the attempts it starts and ends,
its steps and its LLM calls. Two kinds of processes are never scraped, and report instead:

- **Run hosts** (Ray actors) put a snapshot of their counters and histograms in their reply to
  the worker's health ping (every second). The worker's ``/metrics`` adds them to its own: the
  sum over its live hosts, plus the last snapshot of each host that is gone, so a counter never
  goes down when a host is retired (a host killed by ``kill -9`` loses at most its last second).
- **Map actors and Ray tasks** run items of many runs. What one chunk (or task) records goes
  into a sink instead (:meth:`Metrics.remote`), carried back with its results to the run host
  that sent it, which adds it to its own registry: a map actor's LLM calls count where their
  run runs.

Gauges are read when scraped, by the process that serves ``/metrics``: the queue (depth, age of
its oldest entry) from Redis, runs running from the worker's hosts, SSE clients from the
gateway. Each family is documented in :data:`HELP` (and in the README's Observability section).
Recording costs a microsecond or two (a dict lookup and a locked add): it is always on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from genx_ray.observe._observer import Observation, Observer

if TYPE_CHECKING:
    from genx_ray.model import Run

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Recorded metrics: counters and histograms, summed across processes (see the docstring).
REGISTRY = CollectorRegistry(auto_describe=True)

_COUNTERS: dict[str, Counter] = {}
_HISTOGRAMS: dict[str, Histogram] = {}


def _counter(name: str, documentation: str, labels: list[str]) -> Counter:
    _COUNTERS[name] = Counter(name, documentation, labels, registry=REGISTRY)
    return _COUNTERS[name]


def _histogram(
    name: str, documentation: str, labels: list[str], buckets: tuple[float, ...]
) -> Histogram:
    _HISTOGRAMS[name] = Histogram(name, documentation, labels, registry=REGISTRY, buckets=buckets)
    return _HISTOGRAMS[name]


RUNS_CREATED = _counter(
    "genx_runs_created", "Runs created (by the API, a schedule, a parent run or a script), by "
    "workflow: the arrival rate.", ["workflow"],
)  # fmt: skip
RUNS_STARTED = _counter(
    "genx_runs_started", "Attempts of runs started on a run host, by workflow; a restarted run, "
    "or one resumed after a wait, starts again.", ["workflow"],
)  # fmt: skip
RUNS_FINISHED = _counter(
    "genx_runs_finished", "Runs that ended, by workflow and status (succeeded, failed, "
    "cancelled): the success rate.", ["workflow", "status"],
)  # fmt: skip
STEP_SECONDS = _histogram(
    "genx_step_duration_seconds", "How long steps took (retries included; map items and maps "
    "too; replays and cache hits not), by component.", ["component"],
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
)  # fmt: skip
LLM_CALLS = _counter(
    "genx_llm_calls", "LLM calls, by model and outcome (ok: a 2xx answer; error: an error "
    "answer, or given up after retries).", ["model", "outcome"],
)  # fmt: skip
LLM_TOKENS = _counter(
    "genx_llm_tokens", "LLM tokens the provider reported, by model and type (input, output).",
    ["model", "type"],
)  # fmt: skip
LLM_RETRIES = _counter(
    "genx_llm_retries", "LLM requests retried (429, 5xx, timeouts, connection errors), by model.",
    ["model"],
)  # fmt: skip
LLM_RATE_LIMITED = _counter(
    "genx_llm_rate_limited", "429 answers from the provider, by model: a budget in "
    "GENX_LLM_LIMITS set above what the provider allows.", ["model"],
)  # fmt: skip
LLM_LIMITER_WAIT = _histogram(
    "genx_llm_limiter_wait_seconds", "How long an LLM request waited for room in its "
    "cluster-wide budget (GENX_LLM_LIMITS, or a Retry-After pause), by model.", ["model"],
    (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)  # fmt: skip
SCHEDULE_SKIPS = _counter(
    "genx_schedule_ticks_skipped", "Ticks of schedules that started no run, by reason (quota: "
    "the tenant over GENX_TENANT_LIMITS; overlap: the schedule's previous run still open).",
    ["reason"],
)  # fmt: skip
SSE_DELAY = _histogram(
    "genx_sse_delivery_delay_seconds", "From an event's append to Redis to its write to an "
    "event-stream client (events appended while the client was connected; Redis's clock "
    "against the gateway's), by format (sse, ndjson).", ["format"],
    (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)  # fmt: skip

# Gauges, read when scraped by the process that serves /metrics (only those it knows).
GAUGES = {
    "genx_runs_running": "Runs executing now on this worker's run hosts (or in it, inline).",
    "genx_queue_depth": "Run attempts in the run queue: waiting for a worker, or being placed.",
    "genx_queue_oldest_age_seconds": "Age of the oldest entry of the run queue (0 when empty): "
    "how long runs wait for a worker.",
    "genx_sse_clients": "Event streams (SSE or NDJSON) this gateway is serving now.",
    "genx_queue_tenant_depth": "Run attempts waiting in the run queue, by tenant and priority.",
    "genx_runs_held_by_concurrency_key": "Queued runs held back by their workflow's concurrency "
    "key (the limit of runs at once for their key is reached).",
    "genx_queue_tenant_oldest_age_seconds": "Age of the oldest run attempt waiting in the run "
    "queue, by tenant and priority.",
}
# A labelled gauge's samples: (labels, value) each.
Labelled = Mapping[str, Sequence[tuple[Mapping[str, str], float]]]

# -- recording ------------------------------------------------------------------------------------


class Deltas:
    """What a map actor's chunk (or a Ray task) recorded, to send back with its results:
    counter increments and histogram observations, as plain data."""

    __slots__ = ("_lock", "counts", "observations")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, tuple[str, ...]], float] = {}
        self.observations: list[tuple[str, tuple[str, ...], float]] = []
        self._lock = threading.Lock()  # sync components record from threads

    def count(self, name: str, labels: tuple[str, ...], value: float) -> None:
        with self._lock:
            self.counts[(name, labels)] = self.counts.get((name, labels), 0.0) + value

    def observe(self, name: str, labels: tuple[str, ...], value: float) -> None:
        with self._lock:
            self.observations.append((name, labels, value))

    def __getstate__(self) -> tuple[Any, Any]:
        return self.counts, self.observations

    def __setstate__(self, state: tuple[Any, Any]) -> None:
        self.counts, self.observations = state
        self._lock = threading.Lock()


_sink: ContextVar[Deltas | None] = ContextVar("genx_metrics_sink", default=None)
_changes = 0  # bumped by every record: a host sends its snapshot only when it moved


def _count(name: str, labels: tuple[str, ...], value: float = 1.0) -> None:
    global _changes
    sink = _sink.get()
    if sink is not None:
        sink.count(name, labels, value)
        return
    _COUNTERS[name].labels(*labels).inc(value)
    _changes += 1


def _observe(name: str, labels: tuple[str, ...], value: float) -> None:
    global _changes
    sink = _sink.get()
    if sink is not None:
        sink.observe(name, labels, value)
        return
    _HISTOGRAMS[name].labels(*labels).observe(value)
    _changes += 1


_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class _Attempt(Observation):
    __slots__ = ("workflow",)

    def __init__(self, workflow: str) -> None:
        self.workflow = workflow

    def ended(self, **outcome: Any) -> None:
        status = outcome.get("status")
        if status in _TERMINAL:
            _count("genx_runs_finished", (self.workflow, status))


class _Timed(Observation):
    """A step or a map: its duration, by component, when it ends (retries included)."""

    __slots__ = ("component",)

    def __init__(self, component: str) -> None:
        self.component = component

    def ended(self, **outcome: Any) -> None:
        if "seconds" in outcome:
            _observe("genx_step_duration_seconds", (self.component,), outcome["seconds"])


class _LLMRequest(Observation):
    __slots__ = ("model",)

    def __init__(self, model: str) -> None:
        self.model = model

    def ended(self, **outcome: Any) -> None:
        ok = outcome.get("ok", True)
        _count("genx_llm_calls", (self.model, "ok" if ok else "error"))
        if prompt := outcome.get("input_tokens", 0):
            _count("genx_llm_tokens", (self.model, "input"), prompt)
        if completion := outcome.get("output_tokens", 0):
            _count("genx_llm_tokens", (self.model, "output"), completion)


class _Remote(Observation):
    """Work for a run hosted elsewhere: what it records goes into a sink, carried back."""

    __slots__ = ("_token", "deltas")

    def __init__(self) -> None:
        self.deltas = Deltas()
        self._token: Any = None

    def __enter__(self) -> Observation:
        self._token = _sink.set(self.deltas)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            _sink.reset(self._token)

    @property
    def carried(self) -> Deltas:
        return self.deltas


class _Stream(Observation):
    __slots__ = ()

    def __enter__(self) -> Observation:
        _Streams.open += 1
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _Streams.open -= 1


class Metrics(Observer):
    """Counters and histograms of this process's registry (see the module docstring)."""

    def run_created(self, workflow: str) -> None:
        _count("genx_runs_created", (workflow,))

    def attempt(self, run: Run, replayable: int) -> Observation:
        _count("genx_runs_started", (run.workflow,))
        return _Attempt(run.workflow)

    def run_ended(self, workflow: str, status: str) -> None:
        if status in _TERMINAL:
            _count("genx_runs_finished", (workflow, status))

    def step(self, component: str, step_id: str) -> Observation:
        return _Timed(component)

    def item_ended(
        self, component: str, step_id: str, seconds: float, error_type: str | None = None
    ) -> None:
        _observe("genx_step_duration_seconds", (component,), seconds)

    def map(self, component: str, map_id: str, items: int, concurrency: int) -> Observation:
        return _Timed(f"{component}.map")

    def remote(
        self, context: str | None, kind: str, component: str, attributes: Mapping[str, Any]
    ) -> Observation:
        return _Remote()

    def absorb(self, carried: Any) -> None:
        """Add what another process recorded (a map actor's chunk, a Ray task) to this one's."""
        if not isinstance(carried, Deltas):
            return
        for (name, labels), value in carried.counts.items():
            _count(name, labels, value)
        for name, labels, value in carried.observations:
            _observe(name, labels, value)

    def llm_waited(self, model: str, seconds: float) -> None:
        _observe("genx_llm_limiter_wait_seconds", (model,), seconds)

    def llm_request(
        self, model: str, operation: str, *, attempt: int, waited: float, step_id: str | None,
        server: tuple[str, int | None] | None,
    ) -> Observation:  # fmt: skip
        return _LLMRequest(model)

    def llm_rate_limited(self, model: str) -> None:
        _count("genx_llm_rate_limited", (model,))

    def llm_retry(self, model: str) -> None:
        _count("genx_llm_retries", (model,))

    def llm_gave_up(self, model: str) -> None:
        _count("genx_llm_calls", (model, "error"))

    def schedule_skipped(self, reason: str) -> None:
        _count("genx_schedule_ticks_skipped", (reason,))

    def stream(self, fmt: str) -> Observation:
        return _Stream()

    def delivered(self, entry_ids: Iterable[bytes], since_ms: float, fmt: str) -> None:
        now = time.time() * 1000
        child = None
        for entry_id in entry_ids:
            appended = int(entry_id.partition(b"-")[0])
            if appended >= since_ms:
                child = child or SSE_DELAY.labels(fmt)
                child.observe(max(0.0, now - appended) / 1000)


class _Streams:
    open = 0  # event streams this process serves now (the gateway's genx_sse_clients)


def sse_clients() -> int:
    return _Streams.open


# -- snapshots, merging and exposition ------------------------------------------------------------

# (family, sample name, labels) -> value: counters and histograms, summable across processes.
Snapshot = dict[tuple[str, str, tuple[tuple[str, str], ...]], float]


def snapshot(*, if_changed_since: int | None = None) -> tuple[int, Snapshot | None]:
    """This process's counters and histograms as plain data, with a change mark; None instead of
    the data when nothing was recorded since the mark ``if_changed_since``."""
    mark = _changes
    if if_changed_since is not None and mark == if_changed_since:
        return mark, None
    out: Snapshot = {}
    for family in REGISTRY.collect():
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(family.name, s.name, tuple(sorted(s.labels.items())))] = s.value
    return mark, out


def add(total: Snapshot, more: Snapshot) -> None:
    """Add ``more`` into ``total``."""
    for key, value in more.items():
        total[key] = total.get(key, 0.0) + value


class _Exposed(Collector):
    def __init__(self, gauges: Mapping[str, float], remote: Snapshot, labelled: Labelled) -> None:
        self.gauges, self.remote, self.labelled = gauges, remote, labelled

    def collect(self) -> Iterable[Metric]:
        for name, value in self.gauges.items():
            yield GaugeMetricFamily(name, GAUGES[name], value=value)
        for name, samples in self.labelled.items():
            names = sorted({k for labels, _ in samples for k in labels})
            gauge = GaugeMetricFamily(name, GAUGES[name], labels=names)
            for labels, value in samples:
                gauge.add_metric([labels.get(k, "") for k in names], value)
            yield gauge
        for family in REGISTRY.collect():
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            seen = set()
            for s in family.samples:
                if s.name.endswith("_created"):  # a process's own start time: not summable
                    continue
                key = (family.name, s.name, tuple(sorted(s.labels.items())))
                seen.add(key)
                merged.samples.append(Sample(s.name, s.labels, s.value + self.remote.get(key, 0)))
            for key, value in self.remote.items():
                if key[0] == family.name and key not in seen:
                    merged.samples.append(Sample(key[1], dict(key[2]), value))
            yield merged


def exposition(
    gauges: Mapping[str, float], remote: Iterable[Snapshot] = (), labelled: Labelled | None = None
) -> bytes:
    """The text exposition: ``gauges`` and ``labelled`` gauges (names of :data:`GAUGES`), this
    process's counters and histograms plus the ``remote`` snapshots (its run hosts'), and the
    process's own figures."""
    total: Snapshot = {}
    for snap in remote:
        add(total, snap)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Exposed(gauges, total, labelled or {}))
    registry.register(ProcessCollector(registry=None))
    return generate_latest(registry)


# -- a /metrics endpoint for processes that serve nothing else (the worker) -----------------------


async def serve_http(
    port: int, render: Callable[[], Awaitable[bytes]], host: str = "0.0.0.0"
) -> asyncio.Server:
    """Serve ``GET /metrics`` on ``host:port`` from this event loop (HTTP/1.1, one request per
    connection: what a Prometheus scrape needs, and nothing else)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if method in (b"GET", b"HEAD") and path == b"/metrics":
                try:
                    status, kind, body = b"200 OK", CONTENT_TYPE.encode(), await render()
                except Exception as exc:  # Redis down, say: the scrape fails, the server stays
                    error = repr(exc).encode()
                    status, kind, body = b"503 Service Unavailable", b"text/plain", error
            else:
                status, kind, body = b"404 Not Found", b"text/plain", b"GET /metrics only\n"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n" + (b"" if method == b"HEAD" else body)
            )  # fmt: skip
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
