"""The digest example: summarize many documents in parallel and stream a report.

``digest`` is the shape of the batch jobs genx-ray is for: fan a step out over many items with
bounded concurrency, publish progress, stream the final write-up as it is produced.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter

from pydantic import BaseModel, Field

from genx_ray import RetryPolicy, component, publish, workflow

SAMPLE = [
    "Ray is a unified framework for scaling AI and Python applications. It provides a compute "
    "layer for parallel processing.",
    "Redis streams are append-only logs with unique, ordered entry ids. Consumers can read "
    "from any id and block for new entries.",
    "Server-sent events deliver a stream of updates over one HTTP response. A client that "
    "reconnects sends the last event id it saw.",
    "Long-running workflows need durable state: a crash should resume from the last completed "
    "step, not from the beginning.",
]
_STOP = {"a", "an", "and", "the", "of", "for", "to", "is", "it", "from", "any", "can", "not", "one"}


class DigestInput(BaseModel):
    texts: list[str] = Field(default_factory=lambda: list(SAMPLE), min_length=1, max_length=10_000)
    concurrency: int = Field(default=8, ge=1, le=256)


class Summary(BaseModel):
    first_sentence: str
    words: int
    keywords: list[str]


class Digest(BaseModel):
    documents: int
    failed: int
    total_words: int
    top_keywords: list[str]
    report: str


@component(retry=RetryPolicy(max_attempts=3, initial_interval=0.2), timeout=30)
async def summarize(text: str) -> Summary:
    """Summarize one document (a stand-in for an LLM call: it takes a little time)."""
    await asyncio.sleep(0.05)
    words = re.findall(r"[a-zA-Z][a-zA-Z-]+", text.lower())
    keywords = [w for w, _ in Counter(w for w in words if w not in _STOP).most_common(3)]
    return Summary(first_sentence=text.split(". ")[0].strip(), words=len(words), keywords=keywords)


@component
async def write_report(summaries: list[Summary]):  # type: ignore[no-untyped-def]
    """Stream the report line by line, as an LLM would stream tokens."""
    yield f"{len(summaries)} documents digested.\n"
    for i, s in enumerate(summaries, 1):
        await asyncio.sleep(0.01)
        yield f"{i}. {s.first_sentence} ({s.words} words; {', '.join(s.keywords)})\n"


@workflow(name="digest")
async def digest(inp: DigestInput) -> Digest:
    """Summarize many documents in parallel and stream a report."""
    publish("phase", {"phase": "summarizing", "documents": len(inp.texts)})
    results = await summarize.map(inp.texts, concurrency=inp.concurrency)
    summaries = [r for r in results if isinstance(r, Summary)]
    publish("phase", {"phase": "writing", "summaries": len(summaries)})
    report = await write_report(summaries)
    counts = Counter(k for s in summaries for k in s.keywords)
    return Digest(
        documents=len(inp.texts),
        failed=len(results) - len(summaries),
        total_words=sum(s.words for s in summaries),
        top_keywords=[k for k, _ in counts.most_common(5)],
        report=report,
    )


@workflow(name="hello")
async def hello(name: str = "world") -> str:
    """Say hello: the smallest workflow."""
    return f"hello, {name}"
