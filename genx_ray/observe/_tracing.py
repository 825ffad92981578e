"""Traces: OpenTelemetry spans of every run, configured by the standard ``OTEL_*`` variables.

One trace per run, across every process that works on it::

    POST /v1/workflows/{name}/runs          gateway     (continues the client's ``traceparent``)
      run {workflow}                         run host    one per attempt: restarts and resumes too
        step {component}                     run host    nested steps under their parent step
          chat {model}                       any         the LLM calls the step made
        map {component}                      run host    items, failed, concurrency
          map chunk {component}              map actor  one per remote call; its items as events
            chat {model}
        step {component}
          task {component}                   Ray task    a placed component's attempt

The context travels as a W3C ``traceparent`` string: written into the run record when the run
is created (the creating request's span, or a short ``create {workflow}`` root span when nothing
is current: a schedule's run), read back by every attempt (so a restarted attempt, or one resumed
after a durable wait, joins the same trace), and passed in each Ray call to map actors and
tasks. The run object shows it as ``trace_id``.

:func:`configure` runs once per process (gateway, worker, run host, map actor, Ray task, script),
and exports over OTLP/HTTP only when an endpoint is named (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or ``OTEL_TRACES_EXPORTER=otlp|console``). Otherwise
tracing is off: :func:`configure` returns None, the process's observer has no :class:`Tracing`,
and no span object is made, no attribute built. The SDK reads the rest of the standard
variables itself
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and its ``_ARG``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``...). A process whose code configured OpenTelemetry
itself before its first run keeps its own provider: genx-ray's spans join it.

Spans are batched and exported in the background; a process that exits normally flushes them,
and a run host flushes whenever it goes idle (a host the worker retires is killed). The batches
are encoded to OTLP protobuf by :mod:`._otlp` (the same bytes as the SDK's encoder, a third of
its CPU) and sent by the SDK exporter's HTTP client.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from genx_ray.model import ConfigError
from genx_ray.observe._observer import Observation, Observer

if TYPE_CHECKING:
    from genx_ray.model import Run

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
_lock = threading.Lock()
_configured = False
_tracer: Tracer | None = None  # None: tracing is off in this process
_provider: Any = None  # the SDK provider this module made (to flush), if any


def configure(role: str) -> Tracer | None:
    """Configure tracing for this process from its ``OTEL_*`` variables, once (later calls
    return the same). ``role`` (gateway, worker, run-host, map-actor, task, script) names the
    process: ``service.name`` is ``genx-<role>`` unless ``OTEL_SERVICE_NAME`` says otherwise, and
    every span carries ``genx.process``. Returns genx-ray's tracer, or None: tracing is off."""
    global _configured, _tracer, _provider
    if _configured:
        return _tracer
    with _lock:
        if _configured:
            return _tracer
        exporter = _exporter(os.environ)
        current = trace.get_tracer_provider()
        if not isinstance(current, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            _tracer = current.get_tracer("genx_ray")  # the process's own configuration
        elif exporter is not None:
            _provider = _sdk_provider(role, exporter)
            trace.set_tracer_provider(_provider)
            _tracer = _provider.get_tracer("genx_ray")
        _configured = True
        return _tracer


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
        from genx_ray.observe._otlp import LeanOTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(LeanOTLPSpanExporter()))
    return provider


def tracing_enabled() -> bool:
    """Whether this process traces (after :func:`configure`)."""
    return _tracer is not None


def configured_tracer() -> Tracer | None:
    """genx-ray's tracer in this process, if :func:`configure` turned tracing on."""
    return _tracer


def flush(timeout: float = 2.0) -> None:
    """Export the spans still buffered (before a process is killed or exits by ``os._exit``)."""
    if _provider is not None:
        _provider.force_flush(int(timeout * 1000))


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


# -- spans as observations -----------------------------------------------------------------------


class _Span(Observation):
    """A span, current within the observation's block and ended at its end."""

    __slots__ = ("_scope", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self._scope: Any = None

    def __enter__(self) -> Observation:
        self._scope = trace.use_span(
            self.span, end_on_exit=True, record_exception=False, set_status_on_exception=False
        )
        self._scope.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._scope is not None:
            self._scope.__exit__(kind, exc, tb)

    def failed(self, error: BaseException | str, error_type: str | None = None) -> None:
        _failed(self.span, error, error_type)


class _Attempt(_Span):
    __slots__ = ()

    def ended(self, **outcome: Any) -> None:
        status = outcome.get("status")
        self.span.set_attribute("genx.run.status", status or "superseded")
        if status == "failed":
            self.span.set_status(Status(StatusCode.ERROR, "the run failed"))


class _Step(_Span):
    __slots__ = ()

    def retried(self, attempt: int, error: BaseException, delay: float) -> None:
        self.span.add_event("retry", {"genx.step.attempt": attempt,
                                      "error.type": type(error).__name__,
                                      "genx.retry.delay_s": delay})  # fmt: skip

    def ended(self, **outcome: Any) -> None:
        attempts = int(outcome.get("attempts", 1))
        self.span.set_attributes({
            "genx.step.attempts": attempts, "genx.step.retries": attempts - 1,
            "genx.step.cache_hit": bool(outcome.get("cache_hit")),
        })  # fmt: skip


class _Map(_Span):
    __slots__ = ()

    def ended(self, **outcome: Any) -> None:
        self.span.set_attributes({"genx.map.failed": outcome.get("failed", 0),
                                  "genx.map.replayed": outcome.get("replayed", 0),
                                  "genx.map.where": outcome.get("where", "loop")})  # fmt: skip


class _LLMRequest(Observation):
    """An LLM request's span: not made current (the call's own work is the HTTP request), ended
    by :meth:`failed` (a retried or failed request) or :meth:`ended`, whichever comes first."""

    __slots__ = ("done", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.done = False

    def ended(self, **outcome: Any) -> None:
        if self.done:
            return
        self.done = True
        if self.span.is_recording():
            attributes: dict[str, Any] = {
                "gen_ai.usage.input_tokens": outcome.get("input_tokens", 0),
                "gen_ai.usage.output_tokens": outcome.get("output_tokens", 0),
            }
            if outcome.get("finish_reasons"):
                attributes["gen_ai.response.finish_reasons"] = list(outcome["finish_reasons"])
            response = outcome.get("response") or {}
            if isinstance(response.get("model"), str):
                attributes["gen_ai.response.model"] = response["model"]
            if isinstance(response.get("id"), str):
                attributes["gen_ai.response.id"] = response["id"]
            self.span.set_attributes(attributes)
        self.span.end()

    def failed(self, error: BaseException | str, error_type: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        _failed(self.span, error, error_type)
        self.span.end()


def _failed(span: Span, error: BaseException | str, error_type: str | None = None) -> None:
    kind = error_type or (type(error).__name__ if isinstance(error, BaseException) else "error")
    span.set_attribute("error.type", kind)
    span.set_status(Status(StatusCode.ERROR, str(error)[:500]))


class Tracing(Observer):
    """Spans of every run, under one trace per run (see the module docstring for the tree)."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def run_context(self, run_id: str, workflow: str) -> str | None:
        """The current span's context (the API request that creates the run, or the step that
        starts a child run), or a short root span's when nothing is current."""
        current = trace.get_current_span()
        if current.get_span_context().is_valid:
            if current.is_recording():
                current.set_attribute("genx.run.id", run_id)
            return traceparent(current)
        span = self.tracer.start_span(f"create {workflow}", kind=SpanKind.PRODUCER)
        if span.is_recording():
            span.set_attributes({"genx.run.id": run_id, "genx.workflow": workflow})
        span.end()
        return traceparent(span)

    def attempt(self, run: Run, replayable: int) -> Observation:
        span = self.tracer.start_span(
            f"run {run.workflow}", context=parent_context(run.traceparent), kind=SpanKind.CONSUMER
        )
        if span.is_recording():
            span.set_attributes({
                "genx.run.id": run.id, "genx.workflow": run.workflow, "genx.attempt": run.attempt,
                "genx.journal.steps": replayable,
            })  # fmt: skip
        return _Attempt(span)

    def step(self, component: str, step_id: str) -> Observation:
        span = self.tracer.start_span(f"step {component}")
        if span.is_recording():
            span.set_attributes({"genx.component": component, "genx.step.id": step_id})
        return _Step(span)

    def step_replayed(self, component: str, step_id: str) -> None:
        span = self.tracer.start_span(f"step {component}")
        if span.is_recording():
            span.set_attributes({"genx.component": component, "genx.step.id": step_id,
                                 "genx.step.replayed": True})  # fmt: skip
        span.end()

    def item_ended(
        self, component: str, step_id: str, seconds: float, error_type: str | None = None
    ) -> None:
        """An item is an event of its map's (or chunk's) span: a span per item costs ~3x as much
        (measured: ~60 us of CPU per item with its export, against ~20 us for an event)."""
        span = trace.get_current_span()
        if not span.is_recording():
            return
        attributes: dict[str, Any] = {"genx.step.id": step_id, "genx.duration_ms": seconds * 1e3}
        if error_type is not None:
            attributes["error.type"] = error_type
        span.add_event("item", attributes)

    def map(self, component: str, map_id: str, items: int, concurrency: int) -> Observation:
        span = self.tracer.start_span(f"map {component}")
        if span.is_recording():
            span.set_attributes({
                "genx.component": component, "genx.step.id": map_id, "genx.map.items": items,
                "genx.map.concurrency": concurrency,
            })  # fmt: skip
        return _Map(span)

    def context(self) -> str | None:
        return traceparent()

    def remote(
        self, context: str | None, kind: str, component: str, attributes: Mapping[str, Any]
    ) -> Observation:
        name = f"map chunk {component}" if kind == "chunk" else f"{kind} {component}"
        span = self.tracer.start_span(name, context=parent_context(context),
                                      kind=SpanKind.CONSUMER)  # fmt: skip
        if span.is_recording():
            span.set_attributes({"genx.component": component, **attributes})
        return _Span(span)

    def llm_request(
        self, model: str, operation: str, *, attempt: int, waited: float, step_id: str | None,
        server: tuple[str, int | None] | None,
    ) -> Observation:  # fmt: skip
        """An LLM request's span (GenAI semantic conventions), under the step that made it."""
        span = self.tracer.start_span(f"{operation} {model}", kind=SpanKind.CLIENT)
        if not span.is_recording():
            return _LLMRequest(span)
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
        return _LLMRequest(span)

    def delivered(self, entry_ids: Iterable[bytes], since_ms: float, fmt: str) -> None:
        pass
