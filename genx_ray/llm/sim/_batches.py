"""The provider Batch API in the LLM simulator: ``/v1/files`` and ``/v1/batches`` as OpenAI has
them, so the openai SDK's ``files`` and ``batches`` work against ``genx sim`` unchanged.

How it works. ``POST /v1/files`` (multipart: ``file`` and ``purpose``; a ``batch`` file must be
named ``*.jsonl``) keeps the file in memory. ``POST /v1/batches`` answers at once with a batch in
``validating`` and starts a task in the simulator's event loop: it checks the input file as
OpenAI does (a JSON object per line with ``custom_id``, ``method: "POST"``, ``url`` equal to the
batch's endpoint and a ``body`` naming one model for the whole file; unique custom_ids; at most
``batch_max_requests`` requests and ``batch_max_bytes`` bytes) and fails the batch with
``errors.data`` (code, line, message, param) if it is not; otherwise the batch is
``in_progress`` for ``batch_delay_ms``, serving its requests a slice at a time so that
``request_counts`` moves, then ``finalizing`` then ``completed``, with ``output_file_id`` (a line
per answered request: ``{"id", "custom_id", "response": {"status_code": 200, "request_id",
"body"}, "error": null}``) and ``error_file_id`` (the failed ones), each only if it has lines.

What stays true:

- A request's ``body`` is answered exactly as the online endpoint answers it
  (:mod:`genx_ray.llm.sim._answers`), usage included; the batch's ``usage`` adds them up.
- A request that fails over HTTP (``batch_error_rate``, ``batch_fail_next``, a model in
  ``down_models``) is an error-file line with ``response.status_code`` 500 (503) and the error as
  the body, ``"error": null``; a request the batch never ran because it expired
  (``batch_expire_ms``, OpenAI's 24 h window made short) is a line with ``"response": null`` and
  ``"error": {"code": "batch_expired"}``. ``request_counts.failed`` counts the error-file lines.
  Which requests ``batch_error_rate`` fails is a function of the seed, the batch's rank since
  the last reset and the request's line: the same batches fail the same way.
- A cancelled batch goes ``cancelling`` then ``cancelled``; its files hold only the requests done
  before, and the others are in neither file (a reader takes a missing custom_id as not run).
- Batch work never counts against the online concurrency cap, rpm or counters: ``/sim/stats``
  has its own (``batches_created``, ``batch_requests_served``, ``batch_requests_failed``,
  ``files_uploaded``). ``POST /sim/reset`` also forgets every file and batch.
- With ``batches: false`` every route here answers 404, as a provider without the Batch API.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from genx_ray.llm.sim import _answers as sim_answers

if TYPE_CHECKING:
    from genx_ray.llm.sim._app import SimConfig, SimStats

ENDPOINTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "/v1/chat/completions": sim_answers.chat_completion,
    "/v1/embeddings": sim_answers.embeddings,
}
PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
SLICES = 100  # request_counts moves this many times at most while in progress
SHOWN_ERRORS = 100  # errors.data of a failed validation lists this many lines at most
EXPIRED = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


class ApiError(Exception):
    """Answered as OpenAI answers an error: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int = field(default_factory=lambda: int(time.time()))

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data),
                "created_at": self.created_at, "filename": self.filename, "purpose": self.purpose,
                "status": "processed", "expires_at": None, "status_details": None}  # fmt: skip


@dataclass
class _Batch:
    obj: dict[str, Any]  # the batch object, as answered
    rank: int  # batches created since the last reset, this one included
    started: float = field(default_factory=time.monotonic)
    out: list[dict[str, Any]] = field(default_factory=list)  # output file lines, so far
    err: list[dict[str, Any]] = field(default_factory=list)  # error file lines, so far


def _page(items: list[dict[str, Any]], after: str | None, limit: int, most: int) -> dict[str, Any]:
    """OpenAI's cursor page of ``items`` (already in order): the ones after ``after``."""
    if not 1 <= limit <= most:
        raise ApiError(400, f"limit must be between 1 and {most}", "limit")
    ids = [item["id"] for item in items]
    if after is not None and after not in ids:
        raise ApiError(400, f"no object {after!r} to list after", "after")
    start = ids.index(after) + 1 if after is not None else 0
    data = items[start : start + limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": start + limit < len(items)}  # fmt: skip


def _form(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename, content)."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.message_from_bytes(head + body, policy=email.policy.HTTP)
    if not content_type.startswith("multipart/form-data") or not message.is_multipart():
        raise ApiError(400, "expected a multipart/form-data upload")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        fields[str(name)] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


def _error(line: int | None, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": param}


def _request(
    n: int, text: bytes, endpoint: str, seen: set[str], model: str | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Line ``n`` of an input file, and what is wrong with it, if anything."""
    try:
        request = json.loads(text)
    except ValueError:
        request = None
    if not isinstance(request, dict):
        return {}, _error(n, "invalid_json_line", "This line is not parseable as valid JSON.")
    missing = [k for k in ("custom_id", "method", "url", "body") if k not in request]
    cid, body = request.get("custom_id"), request.get("body")
    if missing:
        return request, _error(n, "missing_required_parameter", f"Missing {missing[0]!r}.",
                               missing[0])  # fmt: skip
    if not isinstance(cid, str):
        return request, _error(n, "invalid_request", "custom_id must be a string.", "custom_id")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return request, _error(n, "invalid_request", "body must name a model.", "body")
    if request["method"] != "POST":
        return request, _error(n, "invalid_request", "method must be 'POST'.", "method")
    if request["url"] != endpoint:
        return request, _error(n, "url_mismatch", f"The url {request['url']!r} is not the "
                               f"batch's endpoint {endpoint!r}.", "url")  # fmt: skip
    if cid in seen:
        return request, _error(n, "duplicate_custom_id", f"The custom_id {cid!r} is used twice.",
                               "custom_id")  # fmt: skip
    if model is not None and body["model"] != model:
        return request, _error(n, "model_mismatch", f"The model {body['model']!r} is not the "
                               f"batch's {model!r}: one model a batch.", "body.model")  # fmt: skip
    return request, None


class Batches:
    """The files and batches of one simulator, and their routes (:meth:`mount`)."""

    def __init__(self, conf: Callable[[], SimConfig], stats: Callable[[], SimStats]) -> None:
        self.conf, self.stats = conf, stats
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _Batch] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def reset(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.files.clear()
        self.batches.clear()

    def file(self, file_id: str) -> _File:
        if file_id not in self.files:
            raise ApiError(404, f"No such File object: {file_id}", "id")
        return self.files[file_id]

    def batch(self, batch_id: str) -> _Batch:
        if batch_id not in self.batches:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", "batch_id")
        return self.batches[batch_id]

    def store(self, filename: str, purpose: str, data: bytes) -> _File:
        f = _File("file-" + secrets.token_hex(12), filename, purpose, data)
        self.files[f.id] = f
        return f

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        endpoint, window = body.get("endpoint"), body.get("completion_window")
        if endpoint not in ENDPOINTS:
            raise ApiError(400, f"endpoint must be one of {sorted(ENDPOINTS)}", "endpoint")
        if window != "24h":
            raise ApiError(400, "completion_window must be '24h'", "completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict) and len(metadata) <= METADATA_PAIRS
            and all(isinstance(k, str) and len(k) <= METADATA_KEY and isinstance(v, str)
                    and len(v) <= METADATA_VALUE for k, v in metadata.items())
        ):  # fmt: skip
            raise ApiError(400, "metadata: at most 16 string pairs, keys <= 64 and values <= "
                           "512 characters", "metadata")  # fmt: skip
        source = self.file(str(body.get("input_file_id")))
        if source.purpose != "batch":
            raise ApiError(400, f"{source.id} has purpose {source.purpose!r}, not 'batch'",
                           "input_file_id")  # fmt: skip
        now = int(time.time())
        self.stats().batches_created += 1
        b = _Batch(rank=self.stats().batches_created, obj={
            "id": "batch_" + secrets.token_hex(16), "object": "batch", "endpoint": endpoint,
            "errors": None, "input_file_id": source.id, "completion_window": "24h",
            "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": now, "in_progress_at": None, "expires_at": now + 24 * 3600,
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata, "model": None, "usage": None,
        })  # fmt: skip
        self.batches[b.obj["id"]] = b
        task = asyncio.get_running_loop().create_task(self._run(b, source.data))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return b.obj

    def validate(self, b: _Batch, data: bytes) -> list[dict[str, Any]]:
        """The file's requests; or, if it is not a valid batch, fails ``b`` and returns none."""
        c = self.conf()
        errors: list[dict[str, Any]] = []
        requests: list[dict[str, Any]] = []
        lines = [(n, text) for n, text in enumerate(data.splitlines(), 1) if text.strip()]
        if len(data) > c.batch_max_bytes:
            size = f"{len(data)} bytes; a batch's may have {c.batch_max_bytes}"
            errors.append(_error(None, "file_too_large", f"The input file has {size}."))
        elif not lines:
            errors.append(_error(None, "empty_file", "The input file is empty."))
        elif len(lines) > c.batch_max_requests:
            count = f"{len(lines)} requests; a batch may have {c.batch_max_requests}"
            errors.append(_error(None, "too_many_tasks", f"The input file has {count}."))
        seen: set[str] = set()
        for n, text in lines if not errors else []:
            model = requests[0]["body"]["model"] if requests else None
            request, error = _request(n, text, b.obj["endpoint"], seen, model)
            if error is not None:
                errors.append(error)
            else:
                seen.add(request["custom_id"])
                requests.append(request)
        if errors:
            b.obj.update(status="failed", failed_at=int(time.time()),
                         errors={"object": "list", "data": errors[:SHOWN_ERRORS]})  # fmt: skip
            return []
        b.obj["model"] = requests[0]["body"]["model"]
        return requests

    def serve(self, b: _Batch, index: int, request: dict[str, Any]) -> None:
        """One request of ``b``: a line of its output or error file."""
        c, s = self.conf(), self.stats()
        key = f"{c.seed}:{b.rank}:{index}:{request['custom_id']}"
        digest = hashlib.sha256(key.encode()).hexdigest()
        status, message = 200, ""
        if request["body"]["model"] in c.down_models:
            status, message = 503, f"{request['body']['model']} is unavailable"
        elif c.batch_fail_next > 0 or int(digest[:8], 16) / 16**8 < c.batch_error_rate:
            c.batch_fail_next = max(0, c.batch_fail_next - 1)
            status, message = 500, "injected failure"
        else:
            try:
                body = ENDPOINTS[b.obj["endpoint"]](request["body"])
            except Exception as exc:  # a body the online endpoint would answer 500 to
                status, message = 500, f"{type(exc).__name__}: {exc}"
        failed = status != 200
        if failed:
            kind = "service_unavailable" if status == 503 else "server_error"
            body = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
        entry = {"id": f"batch_req_{digest[8:40]}", "custom_id": request["custom_id"],
                 "response": {"status_code": status, "request_id": f"req_{digest[40:]}",
                              "body": body}, "error": None}  # fmt: skip
        (b.err if failed else b.out).append(entry)
        counts = b.obj["request_counts"]
        counts["failed" if failed else "completed"] += 1
        if failed:
            s.batch_requests_failed += 1
        else:
            s.batch_requests_served += 1

    async def _run(self, b: _Batch, data: bytes) -> None:
        await asyncio.sleep(0)  # the create answers first, in "validating"
        requests = self.validate(b, data)
        obj, counts = b.obj, b.obj["request_counts"]
        if obj["status"] == "failed":
            return
        if obj["status"] == "validating":  # not cancelled meanwhile
            obj.update(status="in_progress", in_progress_at=int(time.time()))
        counts["total"] = len(requests)
        slices = min(SLICES, len(requests))
        size = -(-len(requests) // slices)
        done = 0
        while done < len(requests) and obj["status"] == "in_progress":
            await asyncio.sleep(self.conf().batch_delay_ms / 1000 / slices)
            expire = self.conf().batch_expire_ms
            if expire is not None and (time.monotonic() - b.started) * 1000 >= expire:
                break
            if obj["status"] != "in_progress":
                break
            for request in requests[done : done + size]:
                self.serve(b, done, request)
                done += 1
        expired = done < len(requests) and obj["status"] == "in_progress"
        for request in requests[done:] if expired else []:
            b.err.append({"id": f"batch_req_{secrets.token_hex(16)}",
                          "custom_id": request["custom_id"], "response": None,
                          "error": EXPIRED})  # fmt: skip
            counts["failed"] += 1
            self.stats().batch_requests_failed += 1
        cancelled = obj["status"] == "cancelling"
        if not cancelled:
            obj.update(status="finalizing", finalizing_at=int(time.time()))
        self.finish(b)
        await asyncio.sleep(0)
        end = "cancelled" if cancelled else "expired" if expired else "completed"
        obj.update({"status": end, f"{end}_at": int(time.time())})

    def finish(self, b: _Batch) -> None:
        """Write ``b``'s output and error files, and add up its usage."""
        files = {"output_file_id": ("output", b.out), "error_file_id": ("error", b.err)}
        for key, (name, lines) in files.items():
            if lines:
                text = "".join(json.dumps(line) + "\n" for line in lines)
                f = self.store(f"{b.obj['id']}_{name}.jsonl", "batch_output", text.encode())
                b.obj[key] = f.id
        used = [line["response"]["body"].get("usage") or {} for line in b.out]
        inputs = sum(u.get("prompt_tokens", 0) for u in used)
        outputs = sum(u.get("completion_tokens", 0) for u in used)
        b.obj["usage"] = {
            "input_tokens": inputs, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": outputs, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": inputs + outputs,
        }  # fmt: skip

    def mount(self, app: FastAPI) -> None:
        """The routes, on ``app``; with ``batches: false`` each answers 404."""

        async def available(request: Request) -> None:
            if not self.conf().batches:
                raise ApiError(404, f"Invalid URL ({request.method} {request.url.path})")

        async def answer_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, ApiError)
            kind = "invalid_request_error"
            error = {"message": str(exc), "type": kind, "param": exc.param, "code": None}
            return JSONResponse({"error": error}, status_code=exc.status)

        app.add_exception_handler(ApiError, answer_error)
        r = APIRouter(prefix="/v1", dependencies=[Depends(available)])

        @r.post("/files")
        async def upload(request: Request) -> dict[str, Any]:
            fields = _form(request.headers.get("content-type", ""), await request.body())
            purpose = fields.get("purpose", (None, b""))[1].decode()
            if "file" not in fields or purpose not in PURPOSES:
                raise ApiError(400, f"expected a 'file' and a 'purpose' in {PURPOSES}", "purpose")
            filename, data = fields["file"]
            filename = filename or "upload"
            if purpose == "batch" and not filename.endswith(".jsonl"):
                raise ApiError(400, "Invalid file format for Batch API. Must be .jsonl", "file")
            self.stats().files_uploaded += 1
            return self.store(filename, purpose, data).wire()

        @r.get("/files")
        async def list_files(
            purpose: str | None = None, limit: int = 10_000, after: str | None = None,
            order: str = "desc",
        ) -> dict[str, Any]:  # fmt: skip
            files = [f.wire() for f in self.files.values() if purpose in (None, f.purpose)]
            return _page(files[::-1] if order == "desc" else files, after, limit, 10_000)

        @r.get("/files/{file_id}")
        async def get_file(file_id: str) -> dict[str, Any]:
            return self.file(file_id).wire()

        @r.get("/files/{file_id}/content")
        async def file_content(file_id: str) -> Response:
            data = self.file(file_id).data
            self.stats().files_read += 1
            if self.conf().file_delay_ms:  # as a large file takes its time to come
                await asyncio.sleep(self.conf().file_delay_ms / 1000)
            return Response(data, media_type="application/octet-stream")

        @r.delete("/files/{file_id}")
        async def delete_file(file_id: str) -> dict[str, Any]:
            del self.files[self.file(file_id).id]
            return {"id": file_id, "object": "file", "deleted": True}

        @r.post("/batches")
        async def create_batch(request: Request) -> dict[str, Any]:
            return self.create(await request.json())

        @r.get("/batches")
        async def list_batches(limit: int = 20, after: str | None = None) -> dict[str, Any]:
            return _page([b.obj for b in self.batches.values()][::-1], after, limit, 100)

        @r.get("/batches/{batch_id}")
        async def get_batch(batch_id: str) -> dict[str, Any]:
            return self.batch(batch_id).obj

        @r.post("/batches/{batch_id}/cancel")
        async def cancel_batch(batch_id: str) -> dict[str, Any]:
            obj = self.batch(batch_id).obj
            if obj["status"] in ("validating", "in_progress"):
                obj.update(status="cancelling", cancelling_at=int(time.time()))
            elif obj["status"] != "cancelling":
                raise ApiError(409, f"Cannot cancel a batch with status '{obj['status']}'.")
            return obj

        app.include_router(r)
