"""The content-generation example: research, outline, a person's review of the outline (if
asked for), then every section written in parallel, each streaming its tokens as ``output``
events of its own step (a UI shows them side by side, told apart by ``step.id``), then the
article assembled.

Each phase is a journaled step: a run restarted after a crash does not pay for the research or
the outline again, nor for any section already written. The review is a durable wait: the run
holds no host while a person reads the outline, and falls back to the draft if nobody answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field

from genx_ray import InputTimeout, RetryPolicy, component, publish, wait_for_input, workflow
from genx_ray.llm import AsyncOpenAI

ANGLES = ("background", "how it works", "examples", "trade-offs", "what to do next", "sources")
DEFAULT_HEADINGS = ("Why it matters", "How it works", "In practice", "Trade-offs", "Next steps")


class ArticleInput(BaseModel):
    topic: str = Field(default="durable workflows for LLM applications", min_length=3)
    sections: int = Field(default=4, ge=1, le=12)
    model: str = "gpt-4o-mini"
    review_seconds: float = Field(
        default=0, ge=0, le=7 * 24 * 3600,
        description="how long to wait for a person to approve or edit the outline (POST "
        "/v1/runs/{id}/input) before writing the draft as it is; 0: no review",
    )  # fmt: skip


class OutlineReview(BaseModel):
    """A person's answer to the outline: approve it as it is, or give the headings to use."""

    approve: bool = True
    headings: list[str] | None = Field(default=None, min_length=1, max_length=12)


class Section(BaseModel):
    heading: str
    text: str


class Article(BaseModel):
    topic: str
    research: list[str]
    outline: list[str]
    sections: list[Section]
    markdown: str


async def _ask(model: str, prompt: str) -> str:
    response = await AsyncOpenAI().chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}]
    )
    return str(response.choices[0].message.content or "")


@component(retry=RetryPolicy(max_attempts=3, initial_interval=0.5), timeout=60)
async def research(angle: str, topic: str, model: str) -> str:
    """One research note: the topic from one angle."""
    return await _ask(model, f"Research notes on {topic}, angle: {angle}. Be factual.")


@component(retry=RetryPolicy(max_attempts=3, initial_interval=0.5), timeout=60)
async def outline(topic: str, notes: list[str], sections: int, model: str) -> list[str]:
    """Section headings, from the notes. Lines of the answer become headings; the rest are
    filled with standard ones (a real model follows the format; the simulator does not)."""
    answer = await _ask(
        model, f"Outline an article on {topic} in {sections} headings, one per line, from:\n"
        + "\n".join(notes),
    )  # fmt: skip
    lines = [line.strip("-#* ").strip() for line in answer.splitlines() if line.strip()]
    headings = [line for line in lines if len(line) < 80][:sections]
    fill = (h for h in DEFAULT_HEADINGS + tuple(f"Part {i}" for i in range(6, 13)))
    while len(headings) < sections:
        candidate = next(fill)
        if candidate not in headings:
            headings.append(candidate)
    return headings


@component(retry=RetryPolicy(max_attempts=2, initial_interval=0.5), timeout=120)
async def write_section(
    heading: str, topic: str, notes: list[str], model: str
) -> AsyncIterator[str]:
    """Stream one section: every chunk is an ``output`` event of this step."""
    stream = await AsyncOpenAI().chat.completions.create(
        model=model, stream=True,
        messages=[{"role": "user", "content": f"Write the section '{heading}' of an article on "
                   f"{topic}. Notes:\n" + "\n".join(notes)}],
    )  # fmt: skip
    yield f"## {heading}\n\n"
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            yield chunk.choices[0].delta.content
    yield "\n"


@workflow(name="article")
async def article(inp: ArticleInput) -> Article:
    """Research a topic, outline it, write every section in parallel (streamed), assemble."""
    publish("phase", {"phase": "researching", "angles": len(ANGLES)})
    notes = list(await asyncio.gather(*(research(a, inp.topic, inp.model) for a in ANGLES)))
    publish("phase", {"phase": "outlining"})
    headings = await outline(inp.topic, notes, inp.sections, inp.model)
    if inp.review_seconds:
        publish("phase", {"phase": "reviewing", "outline": headings})
        try:
            review = await wait_for_input(
                OutlineReview, timeout=inp.review_seconds,
                prompt="Approve the outline, or send the headings to write instead.",
            )  # fmt: skip
            if review.headings:
                headings = review.headings
        except InputTimeout:
            publish("phase", {"phase": "reviewed", "by": "nobody: the draft outline is used"})
    publish("phase", {"phase": "writing", "sections": headings})
    texts = await asyncio.gather(*(write_section(h, inp.topic, notes, inp.model) for h in headings))
    sections = [Section(heading=h, text=t) for h, t in zip(headings, texts, strict=True)]
    markdown = f"# {inp.topic.capitalize()}\n\n" + "\n".join(s.text for s in sections)
    return Article(topic=inp.topic, research=notes, outline=headings, sections=sections,
                   markdown=markdown)  # fmt: skip
