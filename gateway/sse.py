"""A run's events on the wire: SSE frames or NDJSON lines, joined from the stored bytes as they are.

Each batch of events (a page of a replay, or what arrived together) goes out as one write, and no
event is decoded, parsed or serialized again: a frame is the stored JSON with its id and type
around it. A quiet stream gets a keep-alive comment every ``PING_SECONDS`` (proxies close idle
connections), and the stream starts with a ``retry:`` hint for EventSource clients. A stream that
loses Redis ends cleanly, after a longer ``retry:`` hint (:mod:`gateway.outage`).

Each tenant has at most ``GENX_MAX_STREAMS_PER_TENANT`` streams open on one gateway
(:class:`StreamSlots`; a run token's count against its run's tenant): past it, 429
``stream_limit`` with Retry-After. A slot is taken before the response starts and given back
when the response ends, however it ends (a whole stream, a client gone, an error). A client cut
off for not reading (:class:`~gateway.hub.SlowReader`) gets a ``retry:`` hint and resumes by id.

Each open stream counts in ``genx_sse_clients``; each event appended while its client was
connected, once written, gives ``genx_sse_delivery_delay_seconds`` its append-to-write delay.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import StreamLimit
from gateway.hub import RawEntry, SlowReader
from gateway.outage import REDIS_DOWN, RETRY_AFTER_SECONDS
from genx_ray.observe import observer

PING_SECONDS = 15.0
RETRY_MS = 1000  # how soon an EventSource reconnects after a dropped connection
STREAM_LIMIT_RETRY_SECONDS = 5.0  # what a tenant at its stream limit is told to wait


class StreamSlots:
    """The event streams each tenant has open on this gateway, at most ``most`` each."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.open: dict[str, int] = {}

    def take(self, tenant: str) -> Callable[[], None]:
        """A slot for one more stream of ``tenant`` (:class:`StreamLimit` when it has ``most``);
        returns the function that gives it back (once, however often it is called)."""
        held = self.open.get(tenant, 0)
        if held >= self.most:
            raise StreamLimit(
                f"tenant {tenant!r} has {self.most} event streams open on this gateway, its most "
                "(GENX_MAX_STREAMS_PER_TENANT); close one, or retry later",
                STREAM_LIMIT_RETRY_SECONDS,
            )
        self.open[tenant] = held + 1
        given = False

        def give() -> None:
            nonlocal given
            if given:
                return
            given = True
            left = self.open.get(tenant, 1) - 1
            if left > 0:
                self.open[tenant] = left
            else:
                self.open.pop(tenant, None)

        return give


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
        except SlowReader:
            # Too far behind to be buffered: the stream ends; an EventSource resumes after the
            # last id it got (every event is still in Redis), an NDJSON reader with ?after=.
            if sse:
                yield f"retry: {RETRY_MS}\n: too far behind; resume from the last id\n\n".encode()
        except REDIS_DOWN:
            # Redis went away: end the stream cleanly (a whole response, not a cut one), and
            # tell an EventSource to come back a little later, resuming after its last id.
            if sse:
                yield f"retry: {RETRY_AFTER_SECONDS * 1000}\n: redis unavailable\n\n".encode()


class _EventStream(StreamingResponse):
    """A streaming response that gives its stream slot back when it ends, however it ends (its
    body may never even start: a client gone before the first byte)."""

    release: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.release is not None:
                self.release()


def event_response(
    batches: AsyncIterator[list[RawEntry]],
    *,
    ndjson: bool = False,
    headers: dict[str, str] | None = None,
    release: Callable[[], None] | None = None,
) -> StreamingResponse:
    """The events as SSE (or NDJSON), closed after the terminal event; ``release`` (the stream's
    slot) is called once the response has ended."""
    response = _EventStream(
        _body(batches, sse=not ndjson),
        media_type=NDJSON if ndjson else SSE,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", **(headers or {})},
    )
    response.release = release
    return response
