"""genx-ray encodes its OTLP span exports itself (genx_ray.observe._otlp, for speed): the bytes
must be the request the SDK's own encoder makes of the same spans, whatever the spans hold."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from genx_ray.observe._otlp import encode_spans


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def _provider(resource: Resource) -> tuple[TracerProvider, _Keep]:
    kept = _Keep()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(kept))
    return provider, kept


def _many_spans() -> list[ReadableSpan]:
    a, kept_a = _provider(Resource.create({"service.name": "genx-map-actor", "process.pid": 7}))
    b, kept_b = _provider(Resource({"service.name": "other"}, schema_url="https://s/1"))
    tracer = a.get_tracer("genx_ray")
    scoped = a.get_tracer("lib", "1.2", schema_url="https://s/2", attributes={"x": 1})
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1),
                         trace_state=TraceState([("k", "v"), ("a", "b")]))  # fmt: skip
    parent = trace.set_span_in_context(trace.NonRecordingSpan(remote))
    with tracer.start_as_current_span("run wf", kind=SpanKind.CONSUMER, context=parent) as run:
        run.set_attributes({
            "genx.run.id": "r1", "genx.attempt": 2, "big": 2**62, "neg": -5, "zero": 0,
            "ratio": 0.25, "flag": True, "off": False, "empty": "", "names": ["a", "", "ü"],
            "nums": [1, 2], "floats": [0.5], "bools": [True, False], "ünïcode": "värde",
        })  # fmt: skip
        for i in range(3):
            span = tracer.start_span(f"chat gpt-{i}", kind=SpanKind.CLIENT,
                                     links=[Link(remote, {"why": "batch"})])  # fmt: skip
            span.set_attributes({"gen_ai.request.model": "gpt-4o-mini", "genx.step.id": f"/{i}"})
            span.add_event("item", {"genx.duration_ms": 100.5 + i, "error.type": "E"})
            span.add_event("bare")
            if i == 1:
                span.set_status(Status(StatusCode.ERROR, "the run failed"))
            elif i == 2:
                span.set_status(Status(StatusCode.OK))
            span.end()
        scoped.start_span("lib work", kind=SpanKind.SERVER).end()
        b.get_tracer("genx_ray").start_span("elsewhere", kind=SpanKind.PRODUCER).end()
    return kept_a.spans + kept_b.spans


def test_the_request_is_the_sdks_byte_for_byte() -> None:
    spans = _many_spans()
    ours = encode_spans(spans)
    assert ours == sdk_encode(spans).SerializeToString(deterministic=True)
    # and twice (the second time from the cache of encoded attributes)
    assert encode_spans(spans) == ours
    decoded = ExportTraceServiceRequest.FromString(ours)
    assert len(decoded.resource_spans) == 2
    assert [len(s.spans) for s in decoded.resource_spans[0].scope_spans] == [4, 1]


def test_an_attribute_the_sdk_cannot_encode_is_left_out_as_the_sdk_leaves_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider, kept = _provider(Resource({"service.name": "s"}))
    span = provider.get_tracer("g").start_span("s")
    span._attributes._dict["huge"] = 2**64  # type: ignore[attr-defined]  # past the SDK's check
    span.set_attribute("kept", "yes")
    span.end()
    with caplog.at_level(logging.ERROR):
        ours = encode_spans(kept.spans)
    assert (
        ExportTraceServiceRequest.FromString(ours)
        .resource_spans[0]
        .scope_spans[0]
        .spans[0]
        .attributes[0]
        .key
        == "kept"
    )
    assert "huge" in caplog.text
