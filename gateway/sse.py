"""A run's events on the wire: SSE frames or NDJSON lines, joined from the stored bytes as they are.

Each batch of events (a page of a replay, or what arrived together) goes out as one write, and no
event is decoded, parsed or serialized again: a frame is the stored JSON with its id and type
around it. A quiet stream gets a keep-alive comment every ``PING_SECONDS`` (proxies close idle
connections), and the stream starts with a ``retry:`` hint for EventSource clients. A stream that
loses Redis ends cleanly, after a longer ``retry:`` hint (:mod:`gateway.outage`).

Each open stream counts in ``genx_sse_clients``; each event appended while its client was
connected, once written, gives ``genx_sse_delivery_delay_seconds`` its append-to-write delay.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse

from gateway.hub import RawEntry
from gateway.outage import REDIS_DOWN, RETRY_AFTER_SECONDS
from genx_ray.observe import observer

PING_SECONDS = 15.0
RETRY_MS = 1000  # how soon an EventSource reconnects after a dropped connection
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"


def sse_frames(batch: list[RawEntry]) -> bytes:
    parts: list[bytes] = []
    for e in batch:
        parts += (b"id: ", e.id, b"\nevent: ", e.type, b"\ndata: ", e.data, b"\n\n")
    return b"".join(parts)


def ndjson_lines(batch: list[RawEntry]) -> bytes:
    # The stored JSON is an object: the id goes in front of its first field.
    parts: list[bytes] = []
    for e in batch:
        parts += (b'{"id":"', e.id, b'",', e.data[1:], b"\n")
    return b"".join(parts)


async def _body(batches: AsyncIterator[list[RawEntry]], sse: bool) -> AsyncIterator[bytes]:
    fmt = "sse" if sse else "ndjson"
    observed = observer()
    with observed.stream(fmt):
        connected_ms = time.time() * 1000  # events appended before this are a replay
        if sse:
            yield f"retry: {RETRY_MS}\n\n".encode()
        last_write = time.monotonic()
        try:
            async for batch in batches:
                if batch:
                    yield sse_frames(batch) if sse else ndjson_lines(batch)
                    observed.delivered((e.id for e in batch), connected_ms, fmt)  # written now
                    last_write = time.monotonic()
                elif sse and time.monotonic() - last_write >= PING_SECONDS:
                    yield b": ping\n\n"
                    last_write = time.monotonic()
        except REDIS_DOWN:
            # Redis went away: end the stream cleanly (a whole response, not a cut one), and
            # tell an EventSource to come back a little later, resuming after its last id.
            if sse:
                yield f"retry: {RETRY_AFTER_SECONDS * 1000}\n: redis unavailable\n\n".encode()


def event_response(
    batches: AsyncIterator[list[RawEntry]],
    *,
    ndjson: bool = False,
    headers: dict[str, str] | None = None,
) -> StreamingResponse:
    """The events as SSE (or NDJSON), closed after the terminal event."""
    return StreamingResponse(
        _body(batches, sse=not ndjson),
        media_type=NDJSON if ndjson else SSE,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", **(headers or {})},
    )
