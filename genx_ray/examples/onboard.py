"""The onboarding example, genx-ray's main job: a user submits a URL; the system crawls the site
over HTTP (same-site links, page and size limits), extracts every page with an LLM, enriches it
with many more calls spread with bounded concurrency, and streams a write-up, publishing status
the whole way. With no URL it crawls the sample site the LLM simulator serves (``genx dev``).
"""

from __future__ import annotations

import asyncio
import os
from html.parser import HTMLParser
from typing import Literal
from urllib.parse import urldefrag, urljoin, urlparse

import httpx
from pydantic import BaseModel, Field

from genx_ray import RetryPolicy, StepError, UserError, component, publish, workflow
from genx_ray.examples import fetching

MAX_PAGE_BYTES = 256 * 1024
QUESTIONS = (
    "Who is the product for?", "What problem does it solve?", "What does it cost?",
    "What proof or numbers are given?", "Where does the company operate?",
    "What integrations are mentioned?", "What is the tone of the page?",
    "What would a buyer ask next?", "Which competitors does it resemble?",
    "What is the main call to action?", "What risks are mentioned?",
    "Who wrote or owns the content?", "What is new or recent?", "What is missing?",
    "What keywords matter for search?", "Which team would care most?",
    "What is the one-line pitch?", "What jargon is used?", "What should sales know?",
    "What should support know?",
)  # fmt: skip


MAX_PAGES = 100  # a run makes at most MAX_PAGES * (1 + len(QUESTIONS)) + 1 LLM calls: 2,101


class OnboardInput(BaseModel):
    url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description="The site (http or https; public addresses only, every redirect checked, "
        "unless the server sets GENX_ALLOW_PRIVATE_URLS=1). Default: the sample site.",
    )
    max_pages: int = Field(default=20, ge=1, le=MAX_PAGES, description="pages crawled, at most")
    questions_per_page: int = Field(
        default=20,
        ge=0,
        le=len(QUESTIONS),
        description="enrichment LLM calls per page: a run makes at most "
        f"{MAX_PAGES * (1 + len(QUESTIONS)) + 1} LLM calls",
    )
    concurrency: int = Field(default=32, ge=1, le=256, description="LLM calls at once, at most")
    model: str = Field(default="gpt-4o-mini", max_length=100)
    enrich_via: Literal["online", "batch"] = Field(
        default="online",
        description='"batch": the enrichment calls go through the provider\'s Batch API (half '
        "the price; the run waits, holding no host, until the batch is done)",
    )


class Page(BaseModel):
    url: str
    title: str
    text: str
    links: list[str]


class PageFacts(BaseModel):
    url: str
    title: str
    summary: str


class Question(BaseModel):
    url: str
    text: str
    question: str
    model: str


class OnboardReport(BaseModel):
    site: str
    pages: int
    crawled: list[str]
    facts: list[PageFacts]
    enrichments: int
    failed: int
    summary: str


class _Html(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.title, self._in = "", ""
        self.text: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in = tag
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.links.append(href)

    def handle_data(self, data: str) -> None:
        if self._in == "title":
            self.title += data.strip()
        elif self._in not in ("script", "style", "a") and data.strip():
            self.text.append(data.strip())


_clients: dict[tuple[int, str | None, int], object] = {}


def llm() -> object:
    """One LLM client per event loop (a client holds connection pools bound to its loop) and per
    provider: the SDK reads ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` when a client is made, so
    a process that points them elsewhere (a notebook, a test) gets a client for the new one."""
    from genx_ray.llm import AsyncOpenAI

    provider = os.environ.get("OPENAI_BASE_URL"), hash(os.environ.get("OPENAI_API_KEY"))
    key = (id(asyncio.get_running_loop()), *provider)
    if key not in _clients:
        _clients[key] = AsyncOpenAI()
    return _clients[key]


@component(retry=RetryPolicy(max_attempts=3, initial_interval=0.5), timeout=30)
async def fetch_page(url: str) -> Page:
    """Fetch and parse one page (HTML only, at most MAX_PAGE_BYTES; public addresses only, see
    :mod:`genx_ray.examples.fetching`)."""
    async with httpx.AsyncClient(timeout=10) as http:
        # The body is read as a stream and cut at MAX_PAGE_BYTES once decompressed.
        response = await fetching.get(http, url, trusted=sample_origins(), max_bytes=MAX_PAGE_BYTES)
        response.raise_for_status()
        if "html" not in response.headers.get("content-type", "html"):
            return Page(url=url, title="", text="", links=[])
        html = response.content.decode(response.encoding or "utf-8", "replace")
    parser = _Html()
    parser.feed(html)
    base = fetching.final_url(response)  # where a redirect led: links are relative to it
    links = [urldefrag(urljoin(base, href))[0] for href in parser.links]
    text = "\n".join(parser.text)[:4000]  # a line per text node: a heading stays off its paragraph
    return Page(url=url, title=parser.title, text=text, links=links)


@component
async def crawl(start: str, max_pages: int) -> list[Page]:
    """Breadth-first over same-site links, each fetch a step of its own (journaled, retried)."""
    site = urlparse(start).netloc
    seen, frontier = {start}, [start]
    pages: list[Page] = []
    while frontier and len(pages) < max_pages:
        batch, frontier = frontier[: max_pages - len(pages)], frontier[max_pages - len(pages) :]
        for result in await fetch_page.map(batch, concurrency=8):
            if isinstance(result, StepError):
                publish("crawl.error", {"step": result.step_id, "error": result.error_message})
                continue
            pages.append(result)
            for link in result.links:
                if urlparse(link).netloc == site and link not in seen:
                    seen.add(link)
                    frontier.append(link)
        publish("crawl", {"pages": len(pages), "queued": len(frontier)})
    return pages


async def _ask(model: str, system: str, user: str) -> str:
    response = await llm().chat.completions.create(  # type: ignore[attr-defined]
        model=model, messages=[{"role": "system", "content": system},
                               {"role": "user", "content": user}],
    )  # fmt: skip
    return str(response.choices[0].message.content)


@component(retry=RetryPolicy(max_attempts=3, initial_interval=0.5), timeout=60)
async def extract(page: Page) -> PageFacts:
    """One LLM call per page: what the page says, in a sentence."""
    summary = await _ask("gpt-4o-mini", "Summarize this web page in one sentence.", page.text)
    return PageFacts(url=page.url, title=page.title, summary=summary)


@component(retry=RetryPolicy(max_attempts=3, initial_interval=0.5), timeout=60, remote=True)
async def enrich(q: Question) -> str:
    """One of the many enrichment calls: a question about a page. Placed (``remote=True``), so
    its map is spread over the Ray cluster's map actors instead of the run's own process."""
    return await _ask(q.model, f"Answer about this page: {q.question}", q.text)


# The same enrichment through the provider's Batch API: its items run on the run's own loop
# (they mostly wait for the batch), so it is not placed; a round is its own timeout.
enrich_in_batch = component(name="enrich", retry=enrich.retry)(enrich.fn)


@component
async def write_up(facts: list[PageFacts], model: str):  # type: ignore[no-untyped-def]
    """Stream the write-up token by token (each chunk an ``output`` event)."""
    notes = "\n".join(f"- {f.title}: {f.summary}" for f in facts)
    stream = await llm().chat.completions.create(  # type: ignore[attr-defined]
        model=model, stream=True,
        messages=[{"role": "user", "content": f"Write an onboarding brief from:\n{notes}"}],
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            yield chunk.choices[0].delta.content


def sample_origins() -> frozenset[str]:
    """The sample site's origin (the simulator's, from the operator's ``OPENAI_BASE_URL``): the
    one private address a request may have crawled without GENX_ALLOW_PRIVATE_URLS."""
    base = os.environ.get("OPENAI_BASE_URL")
    if not base:
        return frozenset()
    parsed = urlparse(base)
    return frozenset({f"{parsed.scheme}://{parsed.netloc}"})


def default_site() -> str:
    origins = sample_origins()
    if not origins:
        raise UserError("no url given, and no simulator to crawl (run under `genx dev`)")
    return f"{next(iter(origins))}/site/index.html"


@workflow(name="onboard")
async def onboard(inp: OnboardInput) -> OnboardReport:
    """Crawl a site, extract every page with an LLM, enrich it with many calls, write a brief."""
    start = inp.url or default_site()
    publish("phase", {"phase": "crawling", "url": start})
    pages = await crawl(start, inp.max_pages)
    publish("phase", {"phase": "extracting", "pages": len(pages)})
    extracted = await extract.map(pages, concurrency=inp.concurrency)
    facts = [f for f in extracted if isinstance(f, PageFacts)]
    questions = [
        Question(url=p.url, text=p.text, question=q, model=inp.model)
        for p in pages for q in QUESTIONS[: inp.questions_per_page]
    ]  # fmt: skip
    publish("phase", {"phase": "enriching", "calls": len(questions)})
    if inp.enrich_via == "batch":
        answers = await enrich_in_batch.map(questions, llm="batch")
    else:
        answers = await enrich.map(questions, concurrency=inp.concurrency)
    failed = sum(isinstance(a, StepError) for a in [*extracted, *answers])
    publish("phase", {"phase": "writing"})
    summary = await write_up(facts, inp.model)
    return OnboardReport(
        site=start, pages=len(pages), crawled=[p.url for p in pages], facts=facts,
        enrichments=len(answers) - sum(isinstance(a, StepError) for a in answers),
        failed=failed, summary=summary,
    )  # fmt: skip
