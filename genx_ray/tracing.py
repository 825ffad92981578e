"""Traces: OpenTelemetry spans of every run, configured by the standard ``OTEL_*`` variables.

One trace per run, across every process that works on it::

    POST /v1/workflows/{name}/runs          gateway     (continues the client's ``traceparent``)
      run {workflow}                         run host    one per attempt: restarts and resumes too
        step {component}                     run host    nested steps under their parent step
          chat {model}                       any         the LLM calls the step made
        map {component}                      run host    items, failed, concurrency
          map chunk {component}              pool actor  one per remote call; its items as events
            chat {model}
        step {component}
          task {component}                   Ray task    a placed component's attempt

The context travels as a W3C ``traceparent`` string: written into the run record when the run
is created (the creating request's span, or a short ``create {workflow}`` root span when nothing
is current: a schedule's run), read back by every attempt (so a restarted attempt, or one resumed
after a durable wait, joins the same trace), and passed in each Ray call to pool actors and
tasks. The run object shows it as ``trace_id``.

:func:`setup` runs once per process (gateway, worker, run host, pool actor, Ray task, script),
and exports over OTLP/HTTP only when an endpoint is named (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or ``OTEL_TRACES_EXPORTER=otlp|console``). Otherwise
tracing is off: :func:`tracer` is None and every helper here returns at once, so no span object
is made and no attribute is built. The SDK reads the rest of the standard variables itself
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and its ``_ARG``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``...). A process whose code configured OpenTelemetry
itself before its first run keeps its own provider: genx-ray's spans join it.

Spans are batched and exported in the background; a process that exits normally flushes them,
and a run host flushes whenever it goes idle (a host the worker retires is killed).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from genx_ray.errors import ConfigError

if TYPE_CHECKING:
    from genx_ray.runs import Run

__all__ = [
    "activated",
    "enabled",
    "flush",
    "override",
    "parent_context",
    "setup",
    "trace_id_of",
    "traceparent",
    "tracer",
]

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
_lock = threading.Lock()
_configured = False
_tracer: Tracer | None = None  # None: tracing is off in this process
_provider: Any = None  # the SDK provider this module made (to flush), if any


def setup(role: str) -> bool:
    """Configure tracing for this process from its ``OTEL_*`` variables, once (later calls do
    nothing). ``role`` (gateway, worker, run-host, pool, task, script) names the process:
    ``service.name`` is ``genx-<role>`` unless ``OTEL_SERVICE_NAME`` says otherwise, and every
    span carries ``genx.process``. Returns whether tracing is on."""
    global _configured, _tracer, _provider
    if _configured:
        return _tracer is not None
    with _lock:
        if _configured:
            return _tracer is not None
        exporter = _exporter(os.environ)
        current = trace.get_tracer_provider()
        if not isinstance(current, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            _tracer = current.get_tracer("genx_ray")  # the process's own configuration
        elif exporter is not None:
            _provider = _sdk_provider(role, exporter)
            trace.set_tracer_provider(_provider)
            _tracer = _provider.get_tracer("genx_ray")
        _configured = True
        return _tracer is not None


def _exporter(env: Mapping[str, str]) -> str | None:
    """Which exporter the variables ask for (``otlp``, ``console``), or None: tracing off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named == "none":
        return None
    if not named:  # the SDK's default would be otlp to localhost: here, only when asked
        if not any(env.get(v, "").strip() for v in _ENDPOINTS):
            return None
        named = "otlp"
    if named not in ("otlp", "console"):
        raise ConfigError("OTEL_TRACES_EXPORTER", f"{named!r}: genx-ray exports otlp or console")
    if named == "otlp":
        for name in _PROTOCOLS:
            protocol = env.get(name, "").strip()
            if protocol and protocol != "http/protobuf":
                raise ConfigError(
                    name, f"{protocol!r}: genx-ray exports OTLP over HTTP (http/protobuf) only"
                )
    return named


def _sdk_provider(role: str, exporter: str) -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({"genx.process": role, "process.pid": os.getpid()})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": f"genx-{role}"}))
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def tracer() -> Tracer | None:
    """genx-ray's tracer, or None when tracing is off in this process."""
    return _tracer


def enabled() -> bool:
    return _tracer is not None


def flush(timeout: float = 2.0) -> None:
    """Export the spans still buffered (before a process is killed or exits by ``os._exit``)."""
    if _provider is not None:
        _provider.force_flush(int(timeout * 1000))


@contextmanager
def override(provider: Any) -> Iterator[None]:
    """Trace into ``provider`` (an SDK ``TracerProvider``) for a while: for tests that capture
    spans in memory. Not for production code: configure with the ``OTEL_*`` variables."""
    global _tracer
    previous = _tracer
    _tracer = provider.get_tracer("genx_ray")
    try:
        yield
    finally:
        _tracer = previous


# -- the W3C context as a string ---------------------------------------------------------------


def traceparent(span: Span | None = None) -> str | None:
    """The W3C ``traceparent`` of ``span`` (default: the current span), or None when there is
    no valid one (tracing off, or no span)."""
    ctx = (span or trace.get_current_span()).get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parent_context(value: str | None) -> otel_context.Context | None:
    """The context a ``traceparent`` names, to start child spans in (None: a new trace)."""
    if not value:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": value})


def trace_id_of(value: str | None) -> str | None:
    """The trace id (32 hex digits) of a ``traceparent``, or None."""
    if not value:
        return None
    parts = value.split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    return parts[1]


@contextmanager
def activated(span: Span | None) -> Iterator[Span | None]:
    """``span`` current (the parent of what starts in the block, tasks included) and ended at
    the end of the block; nothing at all for None (tracing off)."""
    if span is None:
        yield None
        return
    with trace.use_span(span, end_on_exit=True, record_exception=False,
                        set_status_on_exception=False):  # fmt: skip
        yield span


def current_span() -> Span | None:
    """The current span if tracing is on and it records, else None."""
    if _tracer is None:
        return None
    span = trace.get_current_span()
    return span if span.is_recording() else None


def failed(span: Span | None, error: BaseException | str, error_type: str | None = None) -> None:
    """Mark ``span`` as failed (``error.type`` and an ERROR status with the message)."""
    if span is None or not span.is_recording():
        return
    kind = error_type or (type(error).__name__ if isinstance(error, BaseException) else "error")
    span.set_attribute("error.type", kind)
    span.set_status(Status(StatusCode.ERROR, str(error)[:500]))


# -- the spans genx-ray opens ---------------------------------------------------------------------


def new_run(run_id: str, workflow: str) -> str | None:
    """The ``traceparent`` a new run records: the current span's (the API request that creates
    it, or the step that starts a child run), or a short root span's when nothing is current.
    None when tracing is off."""
    tr = _tracer
    if tr is None:
        return None
    current = trace.get_current_span()
    if current.get_span_context().is_valid:
        if current.is_recording():
            current.set_attribute("genx.run.id", run_id)
        return traceparent(current)
    span = tr.start_span(f"create {workflow}", kind=SpanKind.PRODUCER)
    if span.is_recording():
        span.set_attributes({"genx.run.id": run_id, "genx.workflow": workflow})
    span.end()
    return traceparent(span)


def attempt_span(run: Run, replayable: int) -> Span | None:
    """The span of one attempt of ``run``, a child of the context its record carries.
    ``replayable``: steps its journal holds (what this attempt does not run again)."""
    tr = _tracer
    if tr is None:
        return None
    span = tr.start_span(
        f"run {run.workflow}", context=parent_context(run.traceparent), kind=SpanKind.CONSUMER
    )
    if span.is_recording():
        span.set_attributes({
            "genx.run.id": run.id, "genx.workflow": run.workflow, "genx.attempt": run.attempt,
            "genx.journal.steps": replayable,
        })  # fmt: skip
    return span


def attempt_done(span: Span | None, status: str | None) -> None:
    if span is None or not span.is_recording():
        return
    span.set_attribute("genx.run.status", status or "superseded")
    if status == "failed":
        span.set_status(Status(StatusCode.ERROR, "the run failed"))


def step_span(component: str, step_id: str) -> Span | None:
    """A step's span (the current span, the run's or a parent step's, is its parent)."""
    tr = _tracer
    if tr is None:
        return None
    span = tr.start_span(f"step {component}")
    if span.is_recording():
        span.set_attributes({"genx.component": component, "genx.step.id": step_id})
    return span


def step_done(span: Span | None, *, attempts: int = 1, cache_hit: bool = False) -> None:
    if span is None or not span.is_recording():
        return
    span.set_attributes({"genx.step.attempts": attempts, "genx.step.retries": attempts - 1,
                         "genx.step.cache_hit": cache_hit})  # fmt: skip


def step_retry(span: Span | None, attempt: int, error: BaseException, delay: float) -> None:
    if span is not None and span.is_recording():
        span.add_event("retry", {"genx.step.attempt": attempt, "error.type": type(error).__name__,
                                 "genx.retry.delay_s": delay})  # fmt: skip


def replayed_step(component: str, step_id: str) -> None:
    """A step an earlier attempt finished: a zero-length span saying so."""
    span = step_span(component, step_id)
    if span is not None:
        if span.is_recording():
            span.set_attribute("genx.step.replayed", True)
        span.end()


def map_span(component: str, map_id: str, items: int, concurrency: int) -> Span | None:
    tr = _tracer
    if tr is None:
        return None
    span = tr.start_span(f"map {component}")
    if span.is_recording():
        span.set_attributes({
            "genx.component": component, "genx.step.id": map_id, "genx.map.items": items,
            "genx.map.concurrency": concurrency,
        })  # fmt: skip
    return span


def map_done(span: Span | None, *, failed: int, replayed: int, where: str) -> None:
    if span is None or not span.is_recording():
        return
    span.set_attributes({"genx.map.failed": failed, "genx.map.replayed": replayed,
                         "genx.map.where": where})  # fmt: skip


def chunk_span(
    parent: str | None, component: str, map_id: str, items: int, run_id: str | None
) -> Span | None:
    """A pool actor's span for one chunk of a map (a child of the map's span, in the caller)."""
    tr = _tracer
    if tr is None:
        return None
    span = tr.start_span(
        f"map chunk {component}", context=parent_context(parent), kind=SpanKind.CONSUMER
    )
    if span.is_recording():
        span.set_attributes({
            "genx.component": component, "genx.step.id": map_id, "genx.map.chunk_items": items,
            "genx.run.id": run_id or "",
        })  # fmt: skip
    return span


def item_event(span: Span | None, step_id: str, seconds: float, error: str | None = None) -> None:
    """A map item as an event of its map's (or chunk's) span: a span per item costs ~3x as much
    (measured: ~60 us of CPU per item with its export, against ~20 us for an event)."""
    if span is None or not span.is_recording():
        return
    attributes: dict[str, Any] = {"genx.step.id": step_id, "genx.duration_ms": seconds * 1e3}
    if error is not None:
        attributes["error.type"] = error
    span.add_event("item", attributes)


def task_span(parent: str | None, component: str) -> Span | None:
    """A Ray task's span: one attempt of a placed component, a child of its step's span."""
    tr = _tracer
    if tr is None:
        return None
    span = tr.start_span(f"task {component}", context=parent_context(parent),
                         kind=SpanKind.CONSUMER)  # fmt: skip
    if span.is_recording():
        span.set_attribute("genx.component", component)
    return span


def llm_span(
    model: str, operation: str, *, attempt: int, waited: float, step_id: str | None,
    server: tuple[str, int | None] | None = None,
) -> Span | None:  # fmt: skip
    """An LLM call's span (GenAI semantic conventions), under the step that made it."""
    tr = _tracer
    if tr is None:
        return None
    span = tr.start_span(f"{operation} {model}", kind=SpanKind.CLIENT)
    if span.is_recording():
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation, "gen_ai.provider.name": "openai",
            "gen_ai.system": "openai",  # the older name, which many backends still read
            "gen_ai.request.model": model, "genx.attempt": attempt,
            "genx.llm.limiter_wait_ms": round(waited * 1e3, 3),
        }  # fmt: skip
        if step_id is not None:
            attributes["genx.step.id"] = step_id
        if server is not None:
            attributes["server.address"] = server[0]
            if server[1] is not None:
                attributes["server.port"] = server[1]
        span.set_attributes(attributes)
    return span


def llm_done(
    span: Span | None, *, input_tokens: int, output_tokens: int, finish_reasons: list[str],
    response: Mapping[str, Any] | None = None,
) -> None:  # fmt: skip
    if span is None:
        return
    if span.is_recording():
        attributes: dict[str, Any] = {
            "gen_ai.usage.input_tokens": input_tokens, "gen_ai.usage.output_tokens": output_tokens,
        }  # fmt: skip
        if finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = finish_reasons
        if response:
            if isinstance(response.get("model"), str):
                attributes["gen_ai.response.model"] = response["model"]
            if isinstance(response.get("id"), str):
                attributes["gen_ai.response.id"] = response["id"]
        span.set_attributes(attributes)
    span.end()


def llm_failed(span: Span | None, reason: str, error_type: str) -> None:
    if span is None:
        return
    failed(span, reason, error_type)
    span.end()
