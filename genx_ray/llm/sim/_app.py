"""``genx sim``: a local OpenAI-compatible server for tests, demos and benchmarks.

``/v1/chat/completions`` (streaming too), ``/v1/embeddings`` and ``/v1/models``, with what makes
real providers hard: latency (a mean and a jitter), a concurrency cap and a requests-per-minute
limit answered by ``429`` + ``Retry-After``, injected ``500``s, and outages of given models
(``503``). Answers are plausible text, a pure function of the request
(:mod:`genx_ray.llm.sim._answers`). ``GET /sim/stats`` reports peak
concurrency, served, rejected and failed requests; ``POST /sim/config`` changes the behaviour at
run time and ``POST /sim/reset`` zeroes the counters. ``/site/...`` serves a small sample web
site (the one the onboarding example crawls by default). ``/v1/files`` and ``/v1/batches`` are
OpenAI's Batch API (:mod:`genx_ray.llm.sim._batches`), unless ``batches`` is off.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from genx_ray.llm.sim import _answers as sim_answers
from genx_ray.llm.sim._batches import Batches

MODELS = ("gpt-4o-mini", "gpt-4o", "sim-small", "sim-large", "text-embedding-3-small")
SAMPLE_SITE = Path(__file__).resolve().parents[2] / "sample_site"


class SimConfig(BaseModel):
    latency_ms: float = Field(default=100.0, ge=0)
    jitter_ms: float = Field(default=0.0, ge=0)
    max_concurrency: int | None = Field(default=None, ge=1)
    rpm: int | None = Field(default=None, ge=1)
    retry_after: float = Field(default=1.0, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    fail_next: int = Field(default=0, ge=0, description="the next N requests answer 500")
    throttle_next: int = Field(default=0, ge=0, description="the next N requests answer 429")
    down_models: list[str] = Field(default_factory=list, description="models answering 503")
    chunk_delay_ms: float = Field(default=2.0, ge=0)
    models: list[str] = Field(default_factory=lambda: list(MODELS), description="/v1/models")
    seed: int = 0
    # The Batch API (genx_ray.llm.sim._batches): its own limits, apart from the online ones.
    batches: bool = Field(default=True, description="false: /v1/files, /v1/batches answer 404")
    batch_delay_ms: float = Field(default=500.0, ge=0, description="a batch's time in progress")
    batch_error_rate: float = Field(default=0.0, ge=0, le=1, description="of batch requests")
    batch_fail_next: int = Field(default=0, ge=0, description="the next N batch requests fail")
    batch_expire_ms: float | None = Field(
        default=None, ge=0, description="a batch not done this long after its creation expires"
    )
    batch_max_requests: int = Field(default=50_000, ge=1, description="per input file")
    batch_max_bytes: int = Field(default=200 * 1024 * 1024, ge=1, description="per input file")
    file_delay_ms: float = Field(default=0.0, ge=0, description="to serve a file's content")


class SimStats(BaseModel):
    in_flight: int = 0
    peak_concurrency: int = 0
    served: int = 0
    rejected: int = 0
    failed: int = 0
    by_model: dict[str, int] = Field(default_factory=dict)
    connections: int = Field(default=0, description="distinct client connections seen")
    files_uploaded: int = 0
    files_read: int = Field(default=0, description="file contents served")
    batches_created: int = 0
    batch_requests_served: int = 0
    batch_requests_failed: int = Field(default=0, description="error-file lines")


def create_sim(config: SimConfig | None = None) -> FastAPI:
    app = FastAPI(title="genx-ray LLM simulator")
    cfg = config or SimConfig()
    state = {"config": cfg, "stats": SimStats()}
    window: deque[float] = deque()
    rng = random.Random(cfg.seed)

    def conf() -> SimConfig:
        c: SimConfig = state["config"]  # type: ignore[assignment]
        return c

    def stats() -> SimStats:
        s: SimStats = state["stats"]  # type: ignore[assignment]
        return s

    def error(status: int, message: str, kind: str, retry_after: float | None = None) -> Response:
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
        body = {"error": {"message": message, "type": kind, "code": kind}}
        return JSONResponse(body, status_code=status, headers=headers)

    def admit(model: str) -> Response | None:
        c, s = conf(), stats()
        s.by_model[model] = s.by_model.get(model, 0) + 1  # every request, answered or not
        if model in c.down_models:
            s.failed += 1
            return error(503, f"{model} is unavailable", "service_unavailable")
        if c.fail_next > 0 or (c.error_rate and rng.random() < c.error_rate):
            c.fail_next = max(0, c.fail_next - 1)
            s.failed += 1
            return error(500, "injected failure", "server_error")
        if c.throttle_next > 0:
            c.throttle_next -= 1
            s.rejected += 1
            return error(429, "rate limited", "rate_limit_exceeded", c.retry_after)
        if c.max_concurrency is not None and s.in_flight >= c.max_concurrency:
            s.rejected += 1
            return error(429, "too many concurrent requests", "rate_limit_exceeded", c.retry_after)
        now = time.monotonic()
        while window and window[0] < now - 60:
            window.popleft()
        if c.rpm is not None and len(window) >= c.rpm:
            s.rejected += 1
            wait = max(0.0, 60 - (now - window[0]))
            return error(429, "requests per minute exceeded", "rate_limit_exceeded", round(wait, 3))
        window.append(now)
        s.in_flight += 1
        s.peak_concurrency = max(s.peak_concurrency, s.in_flight)
        return None

    async def latency() -> None:
        c = conf()
        await asyncio.sleep(
            max(0.0, rng.gauss(c.latency_ms, c.jitter_ms) if c.jitter_ms else c.latency_ms) / 1000
        )

    def done() -> None:
        s = stats()
        s.in_flight -= 1
        s.served += 1

    peers: set[tuple[str, int]] = set()

    async def arrive(request: Request) -> tuple[dict[str, Any], str, Response | None]:
        """The request's body and model, and the refusal to send instead, if any."""
        if request.client is not None and (request.client.host, request.client.port) not in peers:
            peers.add((request.client.host, request.client.port))
            stats().connections += 1
        body = await request.json()
        model = str(body.get("model", ""))
        return body, model, admit(model)

    async def respond() -> None:
        """An admitted request's latency; it counts as served once that has passed."""
        try:
            await latency()
        finally:
            done()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body, model, refused = await arrive(request)
        if refused is not None:
            return refused
        completion = sim_answers.chat_completion(body)
        if not body.get("stream"):
            await respond()
            return JSONResponse(completion)

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def chunks() -> AsyncIterator[bytes]:
            try:
                await latency()
                base = {"id": completion["id"], "object": "chat.completion.chunk",
                        "created": completion["created"], "model": model}  # fmt: skip
                choice = completion["choices"][0]
                words = choice["message"]["content"].split(" ")
                for i, word in enumerate(words):
                    delta = {"content": word + ("" if i == len(words) - 1 else " ")}
                    if i == 0:
                        delta["role"] = "assistant"
                    chunk = {
                        **base,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                    }
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                    await asyncio.sleep(conf().chunk_delay_ms / 1000)
                end = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
                last = {**base, "choices": [end]}
                yield f"data: {json.dumps(last)}\n\n".encode()
                if include_usage:
                    tail = {**base, "choices": [], "usage": completion["usage"]}
                    yield f"data: {json.dumps(tail)}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:
                done()

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body, _, refused = await arrive(request)
        if refused is not None:
            return refused
        await respond()
        return JSONResponse(sim_answers.embeddings(body))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "genx-sim"}
            for m in conf().models
        ]
        return {"object": "list", "data": data}

    batches = Batches(conf, stats)
    batches.mount(app)
    app.mount("/site", StaticFiles(directory=SAMPLE_SITE, html=True), name="site")

    @app.get("/sim/stats")
    async def get_stats() -> SimStats:
        return stats()

    @app.post("/sim/reset")
    async def reset() -> SimStats:
        state["stats"] = SimStats()
        peers.clear()
        window.clear()
        batches.reset()
        return stats()

    @app.post("/sim/config")
    async def set_config(changes: dict[str, Any]) -> SimConfig:
        state["config"] = SimConfig.model_validate({**conf().model_dump(), **changes})
        return conf()

    return app
