"""The HTTP transport under the openai SDK: where every call gets its limits, retries, fallback,
cache, events, usage accounting, metrics and span. Working at the HTTP layer keeps the SDK's
surface unchanged: any call the SDK can make passes through here as a request.

Each request sent to the provider (a retry is another) gets a span with the GenAI semantic
conventions (model, tokens, finish reasons), a child of the step that made the call
(reported to the run's observer, :mod:`genx_ray.observe`); calls, tokens, retries, 429s and the
limiter's wait are counted by model. The response cache is per tenant (the
run's; a tenant never gets another's cached answer)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx  # the HTTP client openai >= 3 is built on

from genx_ray.flow import current_batch, current_run, current_step, in_streaming_step
from genx_ray.llm import _policy as breakers
from genx_ray.llm._batches import batched
from genx_ray.llm._limits import Limiter, Slot
from genx_ray.llm._policy import Policy
from genx_ray.llm._shared import Shared, shared_state
from genx_ray.llm._usage import account, publish
from genx_ray.model import DEFAULT_TENANT, ConfigError, OutputEvent, Settings
from genx_ray.observe import Observation
from genx_ray.observe import observer as process_observer
from genx_ray.store import keys

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
DROP_HEADERS = {"content-encoding", "content-length", "transfer-encoding"}


@dataclass
class _Call:
    model: str
    attempts: int = 0
    retries: int = 0
    started: float = field(default_factory=time.perf_counter)


class GenxTransport(httpx.AsyncBaseTransport):
    def __init__(self, policy: Policy, settings: Settings) -> None:
        self.policy, self.settings = policy, settings
        self._fallback_checked = False

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
        response = await shared_state(self.settings).inner.handle_async_request(listing)
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
        shared = shared_state(self.settings)
        try:
            body = json.loads(request.content) if request.content else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or "model" not in body:
            return await shared.inner.handle_async_request(request)
        if current_batch() is not None:  # an item of a map(llm="batch"): into its batch
            return await batched(request, body)
        await self._check_fallback(request)
        cache_key = None
        ttl = self.policy.cache_ttl
        if ttl and not body.get("stream"):
            digest = hashlib.sha256(request.url.path.encode() + request.content).hexdigest()
            run = current_run()  # a tenant never reads another's cached answers
            cache_key = keys.llm_cache(digest, run.tenant if run is not None else DEFAULT_TENANT)
            hit = await shared.redis.get(cache_key)
            if hit is not None:
                return httpx.Response(200, json=json.loads(hit), request=request)
        errors: list[str] = []
        for model in breakers.chain(self.policy, str(body["model"])):
            if model != body["model"]:
                publish(
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
                breakers.succeeded(model)
                if cache_key is not None and ttl and response.status_code == 200:
                    await shared.redis.set(cache_key, response.content, px=int(ttl * 1000))
                return response
            breakers.failed(self.policy, model)
        error = {"message": "; ".join(errors[-3:]), "type": "genx_upstream_failed"}
        return httpx.Response(502, json={"error": error}, request=request)

    async def _attempts(
        self, shared: Shared, request: httpx.Request, body: dict[str, Any], call: _Call,
        errors: list[str],
    ) -> httpx.Response | None:  # fmt: skip
        estimate = len(request.content) // 4 + int(
            body.get("max_completion_tokens") or body.get("max_tokens") or 256
        )
        limiter = shared.limiter
        delay = self.policy.initial_interval
        run = current_run()
        observer = run.observer if run is not None else process_observer()
        while call.attempts < self.policy.max_attempts:
            call.attempts += 1
            waited = time.perf_counter()
            slot = await limiter.acquire(  # the run's tenant's budget too, if it has one
                call.model, estimate, tenant=run.tenant if run is not None else None
            )
            waited = time.perf_counter() - waited
            observer.llm_waited(call.model, waited)
            step = current_step()
            observed = observer.llm_request(
                call.model, _operation(request), attempt=call.attempts, waited=waited,
                step_id=step.id if step is not None else None,
                server=(request.url.host, request.url.port),
            )  # fmt: skip
            retry_after: float | None = None
            try:
                response = await shared.inner.handle_async_request(request)
            except (httpx.TransportError, OSError) as exc:
                reason = f"{call.model}: {type(exc).__name__}: {exc}"
                await limiter.release(slot)
                observed.failed(reason, type(exc).__name__)
            else:
                if response.status_code < 400 or response.status_code not in RETRY_STATUS:
                    if body.get("stream") and response.status_code == 200:
                        return self._stream(response, request, slot, observed, call, limiter)
                    return await self._finish(response, request, slot, observed, call, limiter)
                await response.aread()
                reason = f"{call.model}: HTTP {response.status_code}"
                retry_after = _retry_after(response)
                await limiter.release(slot)
                if response.status_code == 429:
                    observer.llm_rate_limited(call.model)
                    if retry_after:  # every process waits, not just us
                        await limiter.pause(call.model, retry_after)
                observed.failed(reason, str(response.status_code))
            errors.append(reason)
            if call.attempts >= self.policy.max_attempts:
                break
            call.retries += 1
            observer.llm_retry(call.model)
            wait = retry_after if retry_after is not None else min(delay, self.policy.max_interval)
            wait *= 1 + random.uniform(0, 0.1)
            publish("llm.retry", {"model": call.model, "attempt": call.attempts, "error": reason,
                                   "delay": round(wait, 3)})  # fmt: skip
            await asyncio.sleep(wait)
            delay *= self.policy.backoff
        observer.llm_gave_up(call.model)
        return None

    async def _finish(
        self, response: httpx.Response, request: httpx.Request, slot: Slot,
        observed: Observation, call: _Call, limiter: Limiter,
    ) -> httpx.Response:  # fmt: skip
        content = await response.aread()
        # Hand the connection back to the pool before the slot: the waiter the release wakes
        # then reuses it instead of opening another (and the pool, scanned on every request,
        # stays as small as the cap).
        await response.aclose()
        body: dict[str, Any] = {}
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
            parsed = json.loads(content)
            body = parsed if isinstance(parsed, dict) else {}
        usage: dict[str, Any] = body.get("usage") or {}
        prompt, completion = (
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
        )
        await limiter.release(
            slot,
            prompt + completion if usage else None,
            account(call.model, prompt, completion, call.retries),
        )
        ok = response.status_code < 400
        if not ok:
            observed.failed(f"HTTP {response.status_code}", str(response.status_code))
        observed.ended(
            ok=ok, input_tokens=prompt, output_tokens=completion,
            finish_reasons=_finish_reasons(body), response=body,
        )  # fmt: skip
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in DROP_HEADERS]
        return httpx.Response(
            response.status_code, headers=headers, content=content, request=request
        )

    def _stream(
        self, response: httpx.Response, request: httpx.Request, slot: Slot,
        observed: Observation, call: _Call, limiter: Limiter,
    ) -> httpx.Response:  # fmt: skip
        class Observed(httpx.AsyncByteStream):
            def __init__(self) -> None:
                self.usage: dict[str, Any] = {}
                self.chunks = 0
                self.closed = False
                self.finish_reasons: list[str] = []
                self.first: dict[str, Any] = {}  # the first chunk: the response's id and model

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
                self.first = self.first or chunk
                for choice in chunk.get("choices") or ():
                    if choice.get("finish_reason"):
                        self.finish_reasons.append(str(choice["finish_reason"]))
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        self.chunks += 1
                        ctx = current_run()
                        # The chunk becomes an output event of the step, unless the step is a
                        # streaming component: then what it yields is its output.
                        if ctx is not None and not in_streaming_step():
                            ctx.writer.emit(
                                OutputEvent(run_id=ctx.run_id, data=text, step=current_step())
                            )

            async def aclose(self) -> None:
                if self.closed:
                    return
                self.closed = True
                await response.aclose()
                prompt = int(self.usage.get("prompt_tokens") or 0)
                completion = int(self.usage.get("completion_tokens") or self.chunks)
                await limiter.release(
                    slot, prompt + completion, account(call.model, prompt, completion, call.retries)
                )
                observed.ended(
                    ok=True, input_tokens=prompt, output_tokens=completion,
                    finish_reasons=self.finish_reasons, response=self.first,
                )  # fmt: skip

        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in DROP_HEADERS]
        return httpx.Response(
            response.status_code, headers=headers, stream=Observed(), request=request
        )


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


def _finish_reasons(body: dict[str, Any]) -> list[str]:
    choices = body.get("choices")
    if not isinstance(choices, list):
        return []
    return [str(c["finish_reason"]) for c in choices
            if isinstance(c, dict) and c.get("finish_reason")]  # fmt: skip
