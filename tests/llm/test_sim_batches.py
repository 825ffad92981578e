"""The simulator's Batch API, over real HTTP with the openai SDK's own files and batches calls:
answers equal to the online endpoint's, error files, progress, cancel, expiry, pagination,
validation like OpenAI's, and a provider without the API."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import Batch

from .conftest import Sim

CHAT = "/v1/chat/completions"
DONE = ("completed", "failed", "expired", "cancelled")


@pytest.fixture
def client(sim_server: Sim) -> Iterator[openai.OpenAI]:
    sim_server.configure(latency_ms=0, batch_delay_ms=100)
    with openai.OpenAI(base_url=sim_server.base_url, api_key="sim", max_retries=0) as c:
        yield c


def _chat(n: int, model: str = "gpt-4o-mini") -> list[dict[str, Any]]:
    return [
        {"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": {"model": model,
         "messages": [{"role": "system", "content": "Summarize."}, {"role": "user",
         "content": f"Parcel {i} left Lyon. It reached Rotterdam in {i + 2} days. All is well."}]}}
        for i in range(n)
    ]  # fmt: skip


def _upload(client: openai.OpenAI, lines: list[Any], name: str = "in.jsonl") -> str:
    data = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
    return client.files.create(file=(name, data), purpose="batch").id


def _batch(client: openai.OpenAI, lines: list[Any], endpoint: str = CHAT, **kw: Any) -> Batch:
    return client.batches.create(
        input_file_id=_upload(client, lines), endpoint=endpoint, completion_window="24h", **kw
    )  # type: ignore[arg-type]


def _wait(client: openai.OpenAI, batch: Batch, until: tuple[str, ...] = DONE) -> Batch:
    deadline = time.monotonic() + 20
    while batch.status not in until:
        assert time.monotonic() < deadline, batch
        time.sleep(0.01)
        batch = client.batches.retrieve(batch.id)
    return batch


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_a_batch_answers_every_request_as_the_online_endpoint_does(
    client: openai.OpenAI, sim_server: Sim
) -> None:
    requests = _chat(20)
    created = _batch(client, requests, metadata={"run": "run_1", "step": "/0:map"})
    assert created.status == "validating" and created.id.startswith("batch_")
    assert created.metadata == {"run": "run_1", "step": "/0:map"}
    batch = _wait(client, created)
    assert batch.status == "completed" and batch.model == "gpt-4o-mini"
    assert batch.request_counts is not None and batch.request_counts.model_dump() == {
        "total": 20, "completed": 20, "failed": 0}  # fmt: skip
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.error_file_id is None  # no failure, no error file
    output = client.files.retrieve(batch.output_file_id or "")
    assert (output.purpose, output.object) == ("batch_output", "file")
    lines = _lines(client, batch.output_file_id)
    stats = sim_server.stats()
    assert stats["batches_created"] == 1 and stats["batch_requests_served"] == 20
    assert stats["files_uploaded"] == 1  # the input; the batch's own files are not uploads
    assert stats["served"] == 0 and stats["peak_concurrency"] == 0  # not online work

    assert sorted(line["custom_id"] for line in lines) == sorted(r["custom_id"] for r in requests)
    bodies = {r["custom_id"]: r["body"] for r in requests}
    for line in lines:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        online = client.chat.completions.create(**bodies[line["custom_id"]])
        online = online.model_dump(exclude_unset=True)
        assert {**response["body"], "created": 0} == {**online, "created": 0}
    answers = [line["response"]["body"]["choices"][0]["message"]["content"] for line in lines]
    assert len(set(answers)) == 20 and all(a.startswith("Parcel ") for a in answers)
    assert batch.usage is not None
    assert batch.usage.output_tokens == sum(
        line["response"]["body"]["usage"]["completion_tokens"] for line in lines
    )


def test_an_embeddings_batch(client: openai.OpenAI) -> None:
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "text-embedding-3-small", "input": f"text {i}"}}
             for i in range(3)]  # fmt: skip
    batch = _wait(client, _batch(client, lines, endpoint="/v1/embeddings"))
    assert batch.status == "completed"
    for line in _lines(client, batch.output_file_id):
        online = client.embeddings.create(**lines[int(line["custom_id"][1:])]["body"])
        assert line["response"]["body"] == online.model_dump(exclude_unset=True)


def test_request_counts_move_while_in_progress(client: openai.OpenAI, sim_server: Sim) -> None:
    sim_server.configure(batch_delay_ms=1500)
    batch = _wait(client, _batch(client, _chat(60)), until=("in_progress",))
    seen = []
    while batch.status == "in_progress":
        assert batch.request_counts is not None
        seen.append(batch.request_counts.completed)
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert seen == sorted(seen) and len({n for n in seen if 0 < n < 60}) >= 3  # it moved


def test_failed_requests_go_to_the_error_file(client: openai.OpenAI, sim_server: Sim) -> None:
    sim_server.configure(batch_delay_ms=50, batch_error_rate=0.3)
    requests = _chat(40)
    first = _wait(client, _batch(client, requests))
    assert first.status == "completed" and first.request_counts is not None
    out, err = _lines(client, first.output_file_id), _lines(client, first.error_file_id)
    assert 0 < len(err) < 40 and len(out) + len(err) == 40
    assert (first.request_counts.completed, first.request_counts.failed) == (len(out), len(err))
    for line in err:
        assert line["error"] is None  # an HTTP failure: the response says it
        assert line["response"]["status_code"] == 500
        assert line["response"]["body"]["error"]["type"] == "server_error"
    assert sim_server.stats()["batch_requests_failed"] == len(err)

    # Deterministic by seed: after a reset, the same file fails on the same requests...
    sim_server.configure(batch_delay_ms=50, batch_error_rate=0.3)
    again = _wait(client, _batch(client, requests))
    assert {x["custom_id"] for x in _lines(client, again.error_file_id)} == {
        x["custom_id"] for x in err}  # fmt: skip
    # ...and the next N fail when told so; a model that is down fails with 503.
    sim_server.configure(batch_delay_ms=50, batch_fail_next=2)
    told = _wait(client, _batch(client, requests[:5]))
    assert [x["custom_id"] for x in _lines(client, told.error_file_id)] == ["r0", "r1"]
    sim_server.configure(batch_delay_ms=50, down_models=["sim-large"])
    down = _wait(client, _batch(client, _chat(2, model="sim-large")))
    assert down.output_file_id is None and down.request_counts is not None
    assert down.request_counts.failed == 2
    assert {x["response"]["status_code"] for x in _lines(client, down.error_file_id)} == {503}


def test_cancel_keeps_what_was_done(client: openai.OpenAI, sim_server: Sim) -> None:
    sim_server.configure(batch_delay_ms=3000)
    batch = _batch(client, _chat(100))
    while batch.request_counts is None or batch.request_counts.completed < 5:
        time.sleep(0.02)
        batch = client.batches.retrieve(batch.id)
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch = _wait(client, batch)
    assert batch.status == "cancelled" and batch.cancelling_at and batch.cancelled_at
    assert batch.request_counts is not None
    done = batch.request_counts.completed
    assert 5 <= done < 100 and len(_lines(client, batch.output_file_id)) == done
    assert batch.error_file_id is None  # the requests never run are in neither file
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_a_batch_not_done_in_its_window_expires(client: openai.OpenAI, sim_server: Sim) -> None:
    sim_server.configure(batch_delay_ms=2000, batch_expire_ms=400)
    batch = _wait(client, _batch(client, _chat(50)))
    assert batch.status == "expired" and batch.expired_at and batch.request_counts is not None
    out, err = _lines(client, batch.output_file_id), _lines(client, batch.error_file_id)
    assert 0 < len(out) < 50 and len(out) + len(err) == 50
    assert batch.request_counts.failed == len(err)
    assert all(x["response"] is None and x["error"]["code"] == "batch_expired" for x in err)


def test_batches_list_newest_first_a_page_at_a_time(client: openai.OpenAI, sim_server: Sim) -> None:
    sim_server.configure(batch_delay_ms=0)
    ids = [_batch(client, _chat(1)).id for _ in range(5)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # the SDK follows `after`
    raw = httpx.get(f"{sim_server.base_url}/batches", params={"limit": 3, "after": ids[3]}).json()
    assert [b["id"] for b in raw["data"]] == ids[::-1][2:]
    assert (raw["first_id"], raw["last_id"], raw["has_more"]) == (ids[2], ids[0], False)
    # Files: listed, read and deleted like OpenAI's.
    files = client.files.list(purpose="batch")
    assert len(files.data) == 5 and all(f.filename == "in.jsonl" for f in files.data)
    assert client.files.delete(files.data[0].id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(files.data[0].id)
    # A reset forgets them all.
    sim_server.configure()
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve(ids[0])


BAD = [
    ("not json", "invalid_json_line", 2),
    ({"custom_id": "r1", "url": CHAT, "body": {"model": "gpt-4o-mini"}}, "missing_required_parameter", 2),
    ({**_chat(1)[0], "url": "/v1/embeddings"}, "url_mismatch", 2),
    (_chat(1)[0], "duplicate_custom_id", 2),
    ({**_chat(2)[1], "body": {"model": "gpt-4o", "messages": []}}, "model_mismatch", 2),
]  # fmt: skip


@pytest.mark.parametrize(("line", "code", "at"), BAD, ids=[b[1] for b in BAD])
def test_an_invalid_input_file_fails_the_batch(
    client: openai.OpenAI, line: Any, code: str, at: int
) -> None:
    batch = _wait(client, _batch(client, [_chat(1)[0], line]))
    assert batch.status == "failed" and batch.failed_at and batch.errors is not None
    assert batch.errors.data is not None
    assert [(e.code, e.line) for e in batch.errors.data] == [(code, at)]
    assert batch.output_file_id is None and batch.error_file_id is None


def test_the_limits_of_an_input_file(client: openai.OpenAI, sim_server: Sim) -> None:
    sim_server.configure(batch_max_requests=3, batch_max_bytes=100_000)
    batch = _wait(client, _batch(client, _chat(4)))
    assert batch.errors is not None and batch.errors.data is not None
    (error,) = batch.errors.data
    assert error.code == "too_many_tasks" and "4 requests" in (error.message or "")
    sim_server.configure(batch_max_bytes=200)
    batch = _wait(client, _batch(client, _chat(2)))
    assert batch.errors is not None and batch.errors.data is not None
    assert [e.code for e in batch.errors.data] == ["file_too_large"]
    batch = _wait(client, _batch(client, []))
    assert batch.errors is not None and batch.errors.data is not None
    assert [e.code for e in batch.errors.data] == ["empty_file"]


def test_requests_refused_at_once(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match=r"Must be \.jsonl"):
        client.files.create(file=("in.txt", b"{}"), purpose="batch")
    file_id = _upload(client, _chat(1))
    create = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
    with pytest.raises(openai.NotFoundError):
        client.batches.create(**{**create, "input_file_id": "file-nope"})  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="metadata"):
        client.batches.create(**create, metadata={str(i): "x" for i in range(17)})  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(**{**create, "completion_window": "1h"})  # type: ignore[arg-type]


def test_a_provider_without_the_batch_api(client: openai.OpenAI, sim_server: Sim) -> None:
    sim_server.configure(batches=False)
    with pytest.raises(openai.NotFoundError, match="Invalid URL"):
        client.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        client.batches.list()
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-x", endpoint=CHAT, completion_window="24h")
    # The online API is there as ever.
    r = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert r.choices[0].message.content == "Hi."
