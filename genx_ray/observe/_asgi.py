"""A span per API request, continuing the client's W3C ``traceparent``: the root of a run's trace
when the request creates one (:meth:`~genx_ray.observe._tracing.Tracing.run_created` records it
in the run).

A plain ASGI middleware (no buffering: event streams go through as they are), installed only
when tracing is on (:func:`tracer`); ``/metrics`` and ``/healthz`` get none. It
records the path, never the query string (run tokens travel there as ``?token=``): FastAPI's
own request spans, which would, are turned off in :func:`gateway.app.create_app`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from genx_ray.observe._tracing import configured_tracer, parent_context

# The ASGI types, spelled out: genx_ray does not import the web framework that serves it.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNTRACED = frozenset({"/metrics", "/healthz"})


class TraceRequests:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = configured_tracer()
        if tracer is None or scope["type"] != "http" or scope["path"] in UNTRACED:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        parent = None
        for name, value in scope["headers"]:
            if name == b"traceparent":
                parent = parent_context(value.decode("latin-1"))
        span = tracer.start_span(f"{method} {scope['path']}", context=parent, kind=SpanKind.SERVER)
        if span.is_recording():
            span.set_attributes({"http.request.method": method, "url.path": scope["path"]})
        status: list[int] = []

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        with trace.use_span(span, end_on_exit=True, record_exception=True):
            try:
                await self.app(scope, receive, sending)
            finally:
                _finish(span, scope, method, status[0] if status else 500)


def _finish(span: Any, scope: Scope, method: str, status: int) -> None:
    if not span.is_recording():
        return
    route = getattr(scope.get("route"), "path", None)
    if route:  # the route's template, not the path: one name for every run
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
