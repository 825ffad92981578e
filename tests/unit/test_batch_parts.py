"""How a batch round's calls become provider batches: one endpoint, model and provider per
file, within the requests and bytes one input file may hold, in a stable order."""

from __future__ import annotations

import pytest

from genx_ray.flow import BatchCall
from genx_ray.flow import _batching as batching


def _call(key: str, model: str = "gpt-4o-mini", path: str = "/v1/chat/completions",
          base: str = "http://a/v1", text: str = "hi") -> BatchCall:  # fmt: skip
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return BatchCall(key, base, "k", path, body)


def test_a_file_holds_one_endpoint_model_and_provider_in_key_order() -> None:
    calls = [_call("c"), _call("a", model="gpt-4o"), _call("b"),
             _call("d", path="/v1/embeddings"), _call("e", base="http://b/v1")]  # fmt: skip
    parts = batching._parts(calls)
    assert [[c.key for c in p] for p in parts] == [["a"], ["b", "c"], ["d"], ["e"]]
    assert batching._parts(list(reversed(calls))) == parts  # the same, however collected


def test_a_round_over_the_file_limits_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "REQUESTS_PER_FILE", 3)
    parts = batching._parts([_call(f"k{i}") for i in range(7)])
    assert [len(p) for p in parts] == [3, 3, 1]
    monkeypatch.setattr(batching, "REQUESTS_PER_FILE", 50_000)
    one = len(_call("k0", text="x" * 1000).line())
    monkeypatch.setattr(batching, "BYTES_PER_FILE", 2 * one + 1)
    parts = batching._parts([_call(f"k{i}", text="x" * 1000) for i in range(5)])
    assert [len(p) for p in parts] == [2, 2, 1]
    assert all(sum(len(c.line()) for c in p) <= 2 * one + 1 for p in parts)
