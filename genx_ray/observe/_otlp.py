"""OTLP/HTTP span export, encoded by hand: the SDK's exporter builds a protobuf object per span,
attribute and value (~50 us of CPU per LLM-call span, the largest part of what tracing cost a map
item), where the wire format is a few length-prefixed byte strings. This writes the same
``ExportTraceServiceRequest`` bytes straight from the SDK's finished spans (tests/unit check
them against the SDK's encoding), keeping the encoded ``KeyValue`` of the attributes that repeat
(a model, an operation, a server) instead of encoding them again, and hands them to the SDK
exporter's own HTTP client: its endpoint, headers, compression, TLS, timeout and retries.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

log = logging.getLogger(__name__)

_pack_double = struct.Struct("<d").pack
_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags
_cache: dict[tuple[int, str, type, Any], bytes] = {}
_CACHE_MAX = 4096


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (``tag`` is the field number << 3 | 2, as one byte)."""
    return bytes((tag,)) + _varint(len(payload)) + payload


def _text(tag: int, value: str | None) -> bytes:
    return _field(tag, value.encode()) if value else b""


def _count(tag: int, n: int) -> bytes:
    return bytes((tag,)) + _varint(n) if n else b""


def _any(value: Any) -> bytes:
    """An ``AnyValue`` message (its oneof field is written even when zero or empty)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(0x0A, value.encode())
    if isinstance(value, int):
        if not -(1 << 63) <= value < 1 << 63:
            raise ValueError(f"{value} is out of the range of an int64")
        return b"\x18" + _varint(value if value >= 0 else value + (1 << 64))
    if isinstance(value, float):
        return b"\x21" + _pack_double(value)
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if isinstance(value, Sequence):
        return _field(0x2A, b"".join(_field(0x0A, _any(v)) for v in value))
    if isinstance(value, Mapping):
        return _field(0x32, b"".join(_field(0x0A, _key_value(str(k), v)) for k, v in value.items()))
    raise TypeError(f"invalid type {type(value).__name__} of value {value!r}")


def _key_value(key: str, value: Any) -> bytes:
    return _field(0x0A, key.encode()) + _field(0x12, _any(value))


def _attributes(tag: int, attributes: Mapping[str, Any] | None) -> bytes:
    """Each attribute as a repeated ``KeyValue`` field ``tag``; scalars from the cache."""
    if not attributes:
        return b""
    parts = []
    # The SDK's BoundedAttributes is a Mapping over a dict: read the dict (3x faster to walk).
    plain: Mapping[str, Any] = getattr(attributes, "_dict", attributes)
    for key, value in plain.items():
        kind = type(value)
        scalar = (
            kind is str
            or kind is int
            or kind is bool
            or kind is float
            or (
                kind is tuple and all(type(v) is str for v in value)  # (1,) == (True,): strs only
            )
        )
        if scalar and (cached := _cache.get((tag, key, kind, value))) is not None:
            parts.append(cached)
            continue
        try:
            encoded = _field(tag, _key_value(key, value))
        except Exception:  # as the SDK's encoder: the attribute is left out, with a log line
            log.exception("Failed to encode key %s", key)
            continue
        if scalar:
            if len(_cache) >= _CACHE_MAX:
                _cache.clear()
            _cache[(tag, key, kind, value)] = encoded
        parts.append(encoded)
    return b"".join(parts)


_FLAGS_LOCAL = b"\x85\x01" + _pack_fixed32(_HAS_IS_REMOTE)
_FLAGS_REMOTE = b"\x85\x01" + _pack_fixed32(_HAS_IS_REMOTE | _IS_REMOTE)
_UNSET = b"\x7a\x00"  # a status with no code and no message: the field, empty
_pack_times = struct.Struct("<BQBQ").pack
_names: dict[tuple[str, int], bytes] = {}


def _span(span: ReadableSpan) -> bytes:
    ctx = span.context
    assert ctx is not None  # an SDK span always has one
    parent = span.parent
    parts = [b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big") + b"\x12\x08"
             + ctx.span_id.to_bytes(8, "big")]  # fmt: skip
    if ctx.trace_state:
        parts.append(_text(0x1A, ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())))
    if parent is not None:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    kind = span.kind.value + 1  # the proto's SpanKind counts UNSPECIFIED first
    named = _names.get((span.name, kind))
    if named is None:
        if len(_names) >= _CACHE_MAX:
            _names.clear()
        named = _names[(span.name, kind)] = _text(0x2A, span.name) + b"\x30" + bytes((kind,))
    parts.append(named)
    start, end = span.start_time, span.end_time
    if start and end:
        parts.append(_pack_times(0x39, start, 0x41, end))
    elif start:
        parts.append(b"\x39" + _pack_fixed64(start))
    elif end:
        parts.append(b"\x41" + _pack_fixed64(end))
    parts.append(_attributes(0x4A, span.attributes))
    parts.append(_count(0x50, span.dropped_attributes))
    for event in span.events:
        body = (b"\x09" + _pack_fixed64(event.timestamp) if event.timestamp else b"") + _text(
            0x12, event.name
        )
        body += _attributes(0x1A, event.attributes) + _count(0x20, event.dropped_attributes)
        parts.append(_field(0x5A, body))
    parts.append(_count(0x60, span.dropped_events))
    for link in span.links:
        body = (
            b"\x0a\x10"
            + link.context.trace_id.to_bytes(16, "big")
            + b"\x12\x08"
            + link.context.span_id.to_bytes(8, "big")
            + _attributes(0x22, link.attributes)
            + _count(0x28, link.dropped_attributes)
            + b"\x35"
            + _pack_fixed32(_HAS_IS_REMOTE | (_IS_REMOTE if link.context.is_remote else 0))
        )
        parts.append(_field(0x6A, body))
    parts.append(_count(0x70, span.dropped_links))
    status = span.status
    code = status.status_code.value
    if code or status.description:
        parts.append(b"\x7a" + _varint_field(_text(0x12, status.description) + _count(0x18, code)))
    else:
        parts.append(_UNSET)
    parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return b"".join(parts)


def _varint_field(payload: bytes) -> bytes:
    """A length prefix and ``payload`` (after a tag written by the caller)."""
    return _varint(len(payload)) + payload


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """The ``ExportTraceServiceRequest`` of ``spans``, serialized: grouped by resource, then by
    instrumentation scope, as the SDK's encoder groups them."""
    # By the resource object, not its value: hashing a Resource dumps its attributes to JSON
    # (the spans of one provider share one object).
    resources: dict[int, Any] = {}
    grouped: dict[int, dict[Any, list[bytes]]] = {}
    for span in spans:
        key = id(span.resource)
        if key not in grouped:
            resources[key], grouped[key] = span.resource, {}
        by_scope = grouped[key]
        by_scope.setdefault(span.instrumentation_scope or None, []).append(_span(span))
    out = []
    for key, by_scope in grouped.items():
        resource = resources[key]
        body = _field(0x0A, _attributes(0x0A, resource.attributes))
        for scope, encoded in by_scope.items():
            if scope is None:
                scope_body = _field(0x0A, b"")
            else:
                scope_body = _field(
                    0x0A,
                    _text(0x0A, scope.name)
                    + _text(0x12, scope.version)
                    + _attributes(0x1A, scope.attributes),
                )
            scope_body += b"".join(b"\x12" + _varint_field(s) for s in encoded)
            if scope is not None:
                scope_body += _text(0x1A, scope.schema_url)
            body += _field(0x12, scope_body)
        body += _text(0x1A, resource.schema_url)
        out.append(_field(0x0A, body))
    return b"".join(out)


class LeanOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter, encoding with :func:`encode_spans`."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        client = getattr(self, "_client", None)
        if client is None or self._shutdown:  # an SDK whose exporter is built otherwise
            return super().export(spans)
        try:
            data = encode_spans(spans)
        except Exception:
            log.exception("Failed to encode span batch")
            return SpanExportResult.FAILURE
        result = client.export(data)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE
