"""The HTTP transport under the openai SDK: where every call gets its limits, retries, fallback,
cache, events, usage accounting and span. Working at the HTTP layer keeps the SDK's surface
unchanged: any call the SDK can make passes through here as a request."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import random
import threading
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx  # the HTTP client openai >= 3 is built on
import redis.asyncio
from openai._constants import DEFAULT_CONNECTION_LIMITS
from opentelemetry import trace

from genx_ray import keys
from genx_ray.connections import async_redis
from genx_ray.context import current_run, current_step, in_streaming_step
from genx_ray.errors import ConfigError
from genx_ray.events import Output, Progress
from genx_ray.llm.limits import Booking, Limiter, Slot
from genx_ray.settings import Settings

log = logging.getLogger("genx_ray.llm")
tracer = trace.get_tracer("genx_ray.llm")
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_DROP_HEADERS = {"content-encoding", "content-length", "transfer-encoding"}
# Rough public prices (USD per million tokens: input, output) for the cost estimate.
PRICES = {"gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6)}
USAGE_FIELDS = ("calls", "prompt_tokens", "completion_tokens", "retries")


@dataclass
class Policy:
    max_attempts: int = 6
    initial_interval: float = 0.5
    backoff: float = 2.0
    max_interval: float = 30.0
    fallback: tuple[str, ...] = ()
    breaker_failures: int = 3  # calls that failed for good before a model is skipped...
    breaker_cooldown: float = 30.0  # ...for this long; then one call tries it again
    cache_ttl: float | None = None


@dataclass
class _Breaker:
    failures: int = 0
    open_until: float = 0.0


# Circuit breakers are per process, not per client: code that makes a client per call (common)
# must still see a model's run of failures.
_breakers: dict[str, _Breaker] = {}


@dataclass
class _Call:
    model: str
    attempts: int = 0
    retries: int = 0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class _Shared:
    """What every client on one event loop shares: the connection pool, the Redis client and
    the limiter (one pump per budget per process, however many clients make calls). A client
    costs next to nothing to build, so code that makes one per call (common) stays fast."""

    inner: httpx.AsyncBaseTransport
    redis: redis.asyncio.Redis
    limiter: Limiter


class _Pools(httpx.AsyncBaseTransport):
    """Several connection pools, requests dealt out in turn. httpcore checks every connection of
    a pool (a syscall or two each) whenever it assigns a request or takes one back: with 64 calls
    in flight that scan was the largest single cost of a call. Eight pools of a few connections
    each scan an eighth as much."""

    SHARDS = 8

    def __init__(self) -> None:
        verify = httpx.create_ssl_context()  # one SSL context (~20 ms to build) for all of them
        # The SDK's own pool limits: httpx's defaults keep only 20 idle connections, which at
        # a cap of 64 closes and reopens connections all the time.
        self.pools = [
            httpx.AsyncHTTPTransport(verify=verify, limits=DEFAULT_CONNECTION_LIMITS)
            for _ in range(self.SHARDS)
        ]
        self._next = itertools.cycle(self.pools)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await next(self._next).handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.aclose()


_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], _Shared]] = (
    weakref.WeakKeyDictionary()
)


def _shared_state(settings: Settings) -> _Shared:
    from genx_ray.connections import resolve_redis_url

    per_loop = _shared.setdefault(asyncio.get_running_loop(), {})
    key = (
        settings.redis_url,
        tuple(sorted(settings.llm_limits.items())),
        settings.llm_lease_seconds,
    )
    state = per_loop.get(key)
    if state is None:
        client = async_redis(resolve_redis_url(settings))  # pings: once per loop, not per call
        inner = _Pools()
        limiter = Limiter(client, settings.llm_limits, settings.llm_lease_seconds)
        state = per_loop[key] = _Shared(inner, client, limiter)
    return state


class GenxTransport(httpx.AsyncBaseTransport):
    def __init__(self, policy: Policy, settings: Settings) -> None:
        self.policy, self.settings = policy, settings
        self._fallback_checked = False
        self._usage: dict[str, dict[str, int]] = {}  # run id -> this process's running totals
        self._usage_sent: dict[str, float] = {}

    async def aclose(self) -> None:
        """Nothing of its own to close: the pool and Redis client are shared by the loop's
        clients and go with the loop."""

    async def _check_fallback(self, request: httpx.Request) -> None:
        """Once: every fallback model must be one the provider lists."""
        if not self.policy.fallback or self._fallback_checked:
            return
        path = request.url.path
        base = path[: path.rindex("/v1/") + 4] if "/v1/" in path else "/"
        auth = {"Authorization": request.headers.get("Authorization", "")}
        url = request.url.copy_with(path=base + "models", query=None)
        listing = httpx.Request("GET", url, headers=auth)
        response = await _shared_state(self.settings).inner.handle_async_request(listing)
        await response.aread()
        if response.status_code == 200:
            known = {m.get("id") for m in response.json().get("data", [])}
            unknown = [m for m in self.policy.fallback if m not in known]
            if unknown:
                raise ConfigError(
                    "fallback", f"unknown model(s) {unknown}; the provider lists {sorted(known)}"
                )
        self._fallback_checked = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shared = _shared_state(self.settings)
        try:
            body = json.loads(request.content) if request.content else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or "model" not in body:
            return await shared.inner.handle_async_request(request)
        await self._check_fallback(request)
        cache_key = None
        ttl = self.policy.cache_ttl
        if ttl and not body.get("stream"):
            digest = hashlib.sha256(request.url.path.encode() + request.content).hexdigest()
            cache_key = f"{keys.PREFIX}:llmcache:{digest}"
            hit = await shared.redis.get(cache_key)
            if hit is not None:
                return httpx.Response(200, json=json.loads(hit), request=request)
        errors: list[str] = []
        for model in self._chain(str(body["model"])):
            if model != body["model"]:
                _publish(
                    "llm.fallback",
                    {
                        "from": body["model"],
                        "to": model,
                        "reason": errors[-1] if errors else "circuit open",
                    },
                )
                body = {**body, "model": model}
                request = _with_body(request, body)
            response = await self._attempts(shared, request, body, _Call(model), errors)
            if response is not None:
                self._breaker(model).failures = 0
                if cache_key is not None and ttl and response.status_code == 200:
                    await shared.redis.set(cache_key, response.content, px=int(ttl * 1000))
                return response
            self._trip(model)
        error = {"message": "; ".join(errors[-3:]), "type": "genx_upstream_failed"}
        return httpx.Response(502, json={"error": error}, request=request)

    def _chain(self, model: str) -> list[str]:
        chain = list(self.policy.fallback)
        chain = chain[chain.index(model) :] if model in chain else [model, *chain]
        now = time.monotonic()
        usable = [m for m in chain if self._breaker(m).open_until <= now]
        return usable or chain[-1:]

    def _breaker(self, model: str) -> _Breaker:
        return _breakers.setdefault(model, _Breaker())

    def _trip(self, model: str) -> None:
        b = self._breaker(model)
        b.failures += 1
        if b.failures >= self.policy.breaker_failures:
            b.open_until = time.monotonic() + self.policy.breaker_cooldown
            b.failures = 0
            log.warning("llm: %s failed %d calls in a row; skipping it for %.0fs", model,
                        self.policy.breaker_failures, self.policy.breaker_cooldown)  # fmt: skip

    async def _attempts(
        self, shared: _Shared, request: httpx.Request, body: dict[str, Any], call: _Call,
        errors: list[str],
    ) -> httpx.Response | None:  # fmt: skip
        estimate = len(request.content) // 4 + int(
            body.get("max_completion_tokens") or body.get("max_tokens") or 256
        )
        limiter = shared.limiter
        delay = self.policy.initial_interval
        while call.attempts < self.policy.max_attempts:
            call.attempts += 1
            slot = await limiter.acquire(call.model, estimate)
            span = tracer.start_span(f"chat {call.model}", kind=trace.SpanKind.CLIENT, attributes={
                "gen_ai.system": "openai", "gen_ai.operation.name": _operation(request),
                "gen_ai.request.model": call.model, "genx.attempt": call.attempts,
            })  # fmt: skip
            retry_after: float | None = None
            try:
                response = await shared.inner.handle_async_request(request)
            except (httpx.TransportError, OSError) as exc:
                reason = f"{call.model}: {type(exc).__name__}: {exc}"
                await limiter.release(slot)
                _end(span, error=reason)
            else:
                if response.status_code < 400 or response.status_code not in _RETRY_STATUS:
                    if body.get("stream") and response.status_code == 200:
                        return self._observe_stream(response, request, slot, span, call, limiter)
                    return await self._finish(response, request, slot, span, call, limiter)
                await response.aread()
                reason = f"{call.model}: HTTP {response.status_code}"
                retry_after = _retry_after(response)
                await limiter.release(slot)
                if response.status_code == 429 and retry_after:
                    await limiter.pause(call.model, retry_after)  # every process waits, not just us
                _end(span, error=reason)
            errors.append(reason)
            if call.attempts >= self.policy.max_attempts:
                break
            call.retries += 1
            wait = retry_after if retry_after is not None else min(delay, self.policy.max_interval)
            wait *= 1 + random.uniform(0, 0.1)
            _publish("llm.retry", {"model": call.model, "attempt": call.attempts, "error": reason,
                                   "delay": round(wait, 3)})  # fmt: skip
            await asyncio.sleep(wait)
            delay *= self.policy.backoff
        return None

    async def _finish(
        self, response: httpx.Response, request: httpx.Request, slot: Slot, span: Any,
        call: _Call, limiter: Limiter,
    ) -> httpx.Response:  # fmt: skip
        content = await response.aread()
        # Hand the connection back to the pool before the slot: the waiter the release wakes
        # then reuses it instead of opening another (and the pool, scanned on every request,
        # stays as small as the cap).
        await response.aclose()
        usage: dict[str, Any] = {}
        with contextlib.suppress(json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            usage = json.loads(content).get("usage") or {}
        prompt, completion = (
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
        )
        await limiter.release(
            slot, prompt + completion if usage else None, self._account(call, prompt, completion)
        )
        _end(span, prompt=prompt, completion=completion)
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _DROP_HEADERS]
        return httpx.Response(
            response.status_code, headers=headers, content=content, request=request
        )

    def _observe_stream(
        self, response: httpx.Response, request: httpx.Request, slot: Slot, span: Any,
        call: _Call, limiter: Limiter,
    ) -> httpx.Response:  # fmt: skip
        transport = self

        class Observed(httpx.AsyncByteStream):
            def __init__(self) -> None:
                self.usage: dict[str, Any] = {}
                self.chunks = 0
                self.closed = False

            async def __aiter__(self) -> AsyncIterator[bytes]:
                buffer = b""
                async for raw in response.aiter_raw():
                    yield raw
                    buffer += raw
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        self._line(line.strip())

            def _line(self, line: bytes) -> None:
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    return
                try:
                    chunk = json.loads(line[5:])
                except json.JSONDecodeError:
                    return
                self.usage = chunk.get("usage") or self.usage
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        self.chunks += 1
                        ctx = current_run()
                        # The chunk becomes an output event of the step, unless the step is a
                        # streaming component: then what it yields is its output.
                        if ctx is not None and not in_streaming_step():
                            ctx.writer.emit(
                                Output(run_id=ctx.run_id, data=text, step=current_step())
                            )

            async def aclose(self) -> None:
                if self.closed:
                    return
                self.closed = True
                await response.aclose()
                prompt = int(self.usage.get("prompt_tokens") or 0)
                completion = int(self.usage.get("completion_tokens") or self.chunks)
                await limiter.release(
                    slot, prompt + completion, transport._account(call, prompt, completion)
                )
                _end(span, prompt=prompt, completion=completion)

        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _DROP_HEADERS]
        return httpx.Response(
            response.status_code, headers=headers, stream=Observed(), request=request
        )

    def _account(self, call: _Call, prompt: int, completion: int) -> Booking | None:
        """The call's usage, booked with its slot's release: added to its run's record.
        Its run hears of it in a ``progress`` event of kind ``llm.usage`` (running totals of this
        process, at most one a second)."""
        ctx = current_run()
        if ctx is None:
            return None
        price_in, price_out = PRICES.get(call.model, (0.0, 0.0))
        # Prices are USD per 1M tokens, i.e. micro-USD per token; kept in nano-USD, whole numbers
        # (HINCRBY) fine enough that thousands of small calls add up without drift.
        cost_nanos = round((prompt * price_in + completion * price_out) * 1000)
        totals = self._usage.setdefault(ctx.run_id, dict.fromkeys(USAGE_FIELDS, 0))
        for name, value in zip(USAGE_FIELDS, (1, prompt, completion, call.retries), strict=True):
            totals[name] += value
        now = time.monotonic()
        if now - self._usage_sent.get(ctx.run_id, 0.0) >= 1.0:
            self._usage_sent[ctx.run_id] = now
            _publish("llm.usage", dict(totals))
        return keys.run(ctx.run_id), {
            "usage_calls": 1, "usage_prompt_tokens": prompt, "usage_completion_tokens": completion,
            "usage_retries": call.retries, "usage_cost_nanos": cost_nanos,
        }  # fmt: skip


def _publish(kind: str, data: dict[str, Any]) -> None:
    ctx = current_run()
    if ctx is not None:
        ctx.writer.emit(Progress(run_id=ctx.run_id, kind=kind, data=data, step=current_step()))


def _with_body(request: httpx.Request, body: dict[str, Any]) -> httpx.Request:
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    return httpx.Request(request.method, request.url, headers=headers, json=body,
                         extensions=request.extensions)  # fmt: skip


def _retry_after(response: httpx.Response) -> float | None:
    for name in ("retry-after-ms", "retry-after"):
        value = response.headers.get(name)
        if value:
            try:
                seconds = float(value) / (1000 if name.endswith("ms") else 1)
            except ValueError:
                continue
            return min(max(seconds, 0.0), 120.0)
    return None


def _operation(request: httpx.Request) -> str:
    path = request.url.path
    return "embeddings" if path.endswith("/embeddings") else "chat" if "chat" in path else path


def _end(span: Any, *, prompt: int = 0, completion: int = 0, error: str | None = None) -> None:
    if error:
        span.set_status(trace.Status(trace.StatusCode.ERROR, error))
    else:
        span.set_attribute("gen_ai.usage.input_tokens", prompt)
        span.set_attribute("gen_ai.usage.output_tokens", completion)
    span.end()


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
        import concurrent.futures
        import contextvars

        async def call() -> tuple[int, list[tuple[str, str]], bytes]:
            response = await self.transport.handle_async_request(request)
            content = await response.aread()
            await response.aclose()
            headers = [
                (k, v) for k, v in response.headers.items() if k.lower() not in _DROP_HEADERS
            ]
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
