"""The content-generation example over real HTTP to the simulator: research, outline, sections
written in parallel, each section's tokens streamed as output events of its own step."""

from __future__ import annotations

import itertools
from collections import defaultdict

from genx_ray import start
from genx_ray.examples.content import ANGLES, article

from .conftest import Sim


def test_article_streams_every_section_in_parallel(sim: Sim) -> None:
    sim.configure(latency_ms=50, chunk_delay_ms=5)
    handle = start(article, {"topic": "durable workflows", "sections": 3})
    result = handle.result(120).model_dump()
    events = [e.event for e in handle.events(follow=False)]

    assert len(result["research"]) == len(ANGLES) and len(result["outline"]) == 3
    # Every section step streamed its text: the chunks of each step, joined, are that section.
    chunks: dict[str, list[str]] = defaultdict(list)
    for e in events:
        if e.type == "output":
            chunks[e.step.id].append(e.data)  # type: ignore[union-attr]
    sections = result["sections"]
    assert len(chunks) == 3
    assert sorted("".join(c) for c in chunks.values()) == sorted(s["text"] for s in sections)
    for s in sections:
        assert s["text"].startswith(f"## {s['heading']}\n\n") and len(s["text"]) > 40
    # ...in parallel: the sections' chunks interleave instead of arriving one section after another.
    order = [e.step.id for e in events if e.type == "output"]  # type: ignore[union-attr]
    switches = sum(a != b for a, b in itertools.pairwise(order))
    assert switches > len(chunks)
    assert result["markdown"].startswith("# Durable workflows\n\n## ")
    phases = [e.data["phase"] for e in events if e.type == "progress" and e.kind == "phase"]  # type: ignore[union-attr]
    assert phases == ["researching", "outlining", "writing"]
