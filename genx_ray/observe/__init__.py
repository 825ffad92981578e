"""Observability: what the engine reports, and where it goes.

The engine reports what happens (an attempt, a step, a map, a chunk on a map actor, an LLM
call, an event stream) to one :class:`Observer` (:mod:`._observer`, the seam); traces
(OpenTelemetry, configured by the standard ``OTEL_*`` variables) and Prometheus metrics are two
implementations of it, composed. Besides: the metrics' exposition (``GET /metrics``), the log of
Redis outages (one line when one starts, one when it ends), secret masking in every log record,
and a span per HTTP request for the gateway. No module outside this room imports
``opentelemetry`` or ``prometheus_client``.
"""

from genx_ray.observe._asgi import TraceRequests
from genx_ray.observe._logs import MASKED, install_log_masking
from genx_ray.observe._metrics import (
    CONTENT_TYPE,
    Metrics,
    Snapshot,
    add,
    exposition,
    serve_http,
    snapshot,
    sse_clients,
)
from genx_ray.observe._observer import NOTHING, Carried, Observation, Observer, Observers
from genx_ray.observe._outage import REDIS_DOWN, OutageLog
from genx_ray.observe._process import observer, setup, traced_into, use
from genx_ray.observe._tracing import Tracing, flush, tracing_enabled

__all__ = [
    "CONTENT_TYPE",
    "MASKED",
    "NOTHING",
    "REDIS_DOWN",
    "Carried",
    "Metrics",
    "Observation",
    "Observer",
    "Observers",
    "OutageLog",
    "Snapshot",
    "TraceRequests",
    "Tracing",
    "add",
    "exposition",
    "flush",
    "install_log_masking",
    "observer",
    "serve_http",
    "setup",
    "snapshot",
    "sse_clients",
    "traced_into",
    "tracing_enabled",
    "use",
]
