"""The sync ``OpenAI`` client served through the async transport, on a private event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading

import httpx2 as httpx  # the HTTP client openai >= 3 is built on

from genx_ray.llm._transport import DROP_HEADERS, GenxTransport


class SyncBridge(httpx.BaseTransport):
    """Serves the sync ``OpenAI`` client through the async transport, on a private event loop.
    The caller's context (its run and step) goes along, so events and usage are the same; a
    stream reaches the caller once complete (its chunks are still live ``output`` events)."""

    _loop: asyncio.AbstractEventLoop | None = None  # one per process, shared by every client
    _lock = threading.Lock()

    def __init__(self, transport: GenxTransport) -> None:
        self.transport = transport
        with SyncBridge._lock:
            if SyncBridge._loop is None:
                SyncBridge._loop = asyncio.new_event_loop()
                threading.Thread(
                    target=SyncBridge._loop.run_forever, name="genx-llm-sync", daemon=True
                ).start()
        self.loop = SyncBridge._loop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def call() -> tuple[int, list[tuple[str, str]], bytes]:
            response = await self.transport.handle_async_request(request)
            content = await response.aread()
            await response.aclose()
            headers = [(k, v) for k, v in response.headers.items() if k.lower() not in DROP_HEADERS]
            return response.status_code, headers, content

        done: concurrent.futures.Future[tuple[int, list[tuple[str, str]], bytes]] = (
            concurrent.futures.Future()
        )
        context = contextvars.copy_context()

        def settle(task: asyncio.Task[tuple[int, list[tuple[str, str]], bytes]]) -> None:
            error = task.exception()
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(task.result())

        def schedule() -> None:
            context.run(self.loop.create_task, call()).add_done_callback(settle)

        self.loop.call_soon_threadsafe(schedule)
        status, headers, content = done.result()
        return httpx.Response(status, headers=headers, content=content, request=request)
