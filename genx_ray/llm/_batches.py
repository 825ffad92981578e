"""The provider side of ``map(llm="batch")`` (:mod:`genx_ray.flow._batching`): a round's calls
as a JSONL file (``files.create``, purpose ``batch``) and a batch of it (``batches.create``),
looked at (``retrieve``), found again by its metadata (``list``), read (``files.content``) and
cancelled, with the openai SDK against the base URL and key the calls themselves used.

A provider without the Batch API (404 or 405 on ``/v1/files`` or ``/v1/batches``) is said so,
naming the model and ``llm="batch"``: :class:`BatchUnsupported`, never an online call instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import httpx2 as httpx
import openai

from genx_ray.flow import BatchCall, current_batch, key_hash
from genx_ray.llm._usage import batch_usage
from genx_ray.model import BatchUnsupported, UserError

LIST_PAGES = 100  # how far back batches.list is searched for a batch made before a crash
EXPIRED_STATUS = 408  # a request the batch never ran in its window


def _client(base_url: str, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=4)


class ProviderBatches:
    """:class:`genx_ray.flow.Batches` over the openai SDK."""

    async def create(
        self, calls: Sequence[BatchCall], *, metadata: dict[str, str], completion_window: str
    ) -> str:
        first = calls[0]
        data = b"".join(call.line() for call in calls)
        async with _client(first.base_url, first.api_key) as client:
            try:
                file = await client.files.create(
                    file=("genx-batch.jsonl", data, "application/jsonl"), purpose="batch"
                )
                batch = await client.batches.create(
                    input_file_id=file.id, endpoint=first.path,  # type: ignore[arg-type]
                    completion_window=completion_window,  # type: ignore[arg-type]
                    metadata=metadata,
                )  # fmt: skip
            except openai.APIStatusError as exc:
                raise _refused(exc, first) from None
        return batch.id

    async def find(self, base_url: str, api_key: str, metadata: dict[str, str]) -> str | None:
        async with _client(base_url, api_key) as client:
            page = await client.batches.list(limit=100)
            for _ in range(LIST_PAGES):
                for batch in page.data:
                    found = batch.metadata or {}
                    if all(found.get(k) == v for k, v in metadata.items()):
                        return batch.id
                if not page.has_next_page():
                    return None
                page = await page.get_next_page()
        return None

    async def retrieve(self, base_url: str, api_key: str, batch_id: str) -> dict[str, Any]:
        async with _client(base_url, api_key) as client:
            batch = await client.batches.retrieve(batch_id)
        return batch.model_dump(mode="json")

    async def results(
        self, base_url: str, api_key: str, batch: Mapping[str, Any]
    ) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        async with _client(base_url, api_key) as client:
            for name in ("output_file_id", "error_file_id"):
                file_id = batch.get(name)
                if not file_id:
                    continue
                content = await client.files.content(str(file_id))
                for line in content.text.splitlines():
                    if line.strip():
                        custom_id, result = _result(json.loads(line))
                        out[custom_id] = result
        return out

    async def cancel(self, base_url: str, api_key: str, batch_id: str) -> None:
        async with _client(base_url, api_key) as client:
            await client.batches.cancel(batch_id)

    def usage(self, results: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
        return batch_usage(results.values())

    def key_for(self, hashed: str) -> str | None:
        own = os.environ.get("OPENAI_API_KEY")
        return own if own and hashed and key_hash(own) == hashed else None


def _result(line: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """An output or error file's line as ``(custom_id, {"status", "body"})``."""
    response = line.get("response")
    if response:
        return str(line["custom_id"]), {
            "status": int(response.get("status_code") or 500), "body": response.get("body"),
        }  # fmt: skip
    error = line.get("error") or {"code": "unknown", "message": "no response"}
    return str(line["custom_id"]), {"status": EXPIRED_STATUS, "body": {"error": error}}


def _refused(exc: openai.APIStatusError, call: BatchCall) -> Exception:
    if exc.status_code in (404, 405):
        path = exc.response.request.url.path
        return BatchUnsupported(
            call.model,
            f"the provider at {call.base_url} has no Batch API (HTTP {exc.status_code} on "
            f'{path}): model {call.model!r} cannot map with llm="batch"; map with '
            'llm="online" or use a provider with batches',
        )
    return exc


async def batched(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    """An LLM call in a batch map's item: its journaled answer, or collected for the round's
    batch (the item waits: it does not return)."""
    rnd = current_batch()
    assert rnd is not None
    path = request.url.path
    if request.method != "POST" or not path.endswith(
        ("/chat/completions", "/embeddings", "/completions", "/responses")
    ):
        raise UserError(f'{request.method} {path} cannot travel in a batch (map llm="batch")')
    if body.get("stream"):
        raise UserError(
            f"model {body.get('model')!r}: a streamed call cannot travel in a batch (map "
            'llm="batch"): call it without stream=True, or map with llm="online"'
        )
    cut = path.find("/v1/")
    base_path, line_path = (path[: cut + 3], path[cut:]) if cut >= 0 else ("", path)
    key = rnd.key(line_path, body)
    answer = rnd.answer(key)
    if answer is not None:
        return httpx.Response(int(answer["status"]), json=answer["body"], request=request)
    auth = request.headers.get("Authorization", "")
    api_key = auth[7:] if auth.lower().startswith("bearer ") else auth
    base_url = str(request.url.copy_with(path=base_path, query=None))
    await rnd.wait(BatchCall(key, base_url, api_key, line_path, body))
