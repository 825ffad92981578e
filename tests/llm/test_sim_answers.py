"""The simulator's chat answers, over real HTTP with the openai SDK: plausible sentences of the
prompt, a pure function of the request, with usage, streaming and max_tokens consistent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from .conftest import Sim

PAGE = (
    "Products\nThe Picker arm handles 1200 items per hour. The Sorter line routes parcels to 64 "
    "destinations. Fleet software schedules every robot from one dashboard. Every robot is leased."
)
SUMMARIZE = "Summarize this web page in one sentence."


@pytest.fixture
def client(sim_server: Sim) -> Iterator[openai.OpenAI]:
    sim_server.configure(latency_ms=0, chunk_delay_ms=0)
    with openai.OpenAI(base_url=sim_server.base_url, api_key="sim", max_retries=0) as c:
        yield c


def _ask(client: openai.OpenAI, user: str, system: str | None = None, **kw: Any) -> Any:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return client.chat.completions.create(model="gpt-4o-mini", messages=messages, **kw)  # type: ignore[arg-type]


def test_a_summary_is_the_texts_own_first_sentences(client: openai.OpenAI) -> None:
    r = _ask(client, PAGE, SUMMARIZE)
    text = r.choices[0].message.content
    # The heading is left out, the first sentence leads, at most three sentences.
    assert text.startswith("The Picker arm handles 1200 items per hour. ")
    assert text.count(". ") == 2 and text.endswith(".") and "Products" not in text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(text.split())
    assert r.usage.prompt_tokens == len(PAGE.split()) + len(SUMMARIZE.split())
    # A pure function of the request: the same again; another text, another answer.
    assert _ask(client, PAGE, SUMMARIZE).choices[0].message.content == text
    other = _ask(client, PAGE.replace("1200", "900"), SUMMARIZE).choices[0].message.content
    assert other != text and "900 items" in other


def test_a_question_is_answered_by_the_sentence_that_matches_it(client: openai.OpenAI) -> None:
    r = _ask(client, PAGE, "Answer about this page: how many items per hour?")
    assert r.choices[0].message.content == "The Picker arm handles 1200 items per hour."
    r = _ask(client, PAGE, "Answer about this page: how are destinations reached?")
    assert r.choices[0].message.content == "The Sorter line routes parcels to 64 destinations."


def test_a_brief_from_a_list_reads_what_the_items_say(client: openai.OpenAI) -> None:
    notes = "- Home | Acme: Acme builds robots.\n- Pricing | Acme: Robots are leased monthly."
    text = _ask(client, f"Write an onboarding brief from:\n{notes}").choices[0].message.content
    assert text == "Acme builds robots. Robots are leased monthly."


def test_short_prompts_still_answer_a_sentence_and_differ(client: openai.OpenAI) -> None:
    answers = [_ask(client, str(i)).choices[0].message.content for i in range(5)]
    assert answers == ["0.", "1.", "2.", "3.", "4."]
    assert _ask(client, "retry me").choices[0].message.content == "Retry me."


def test_streamed_chunks_join_to_the_same_answer_and_usage(client: openai.OpenAI) -> None:
    whole = _ask(client, PAGE, SUMMARIZE)
    stream = _ask(client, PAGE, SUMMARIZE, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage


def test_max_tokens_cuts_the_answer(client: openai.OpenAI) -> None:
    r = _ask(client, PAGE, SUMMARIZE, max_tokens=4)
    assert r.choices[0].message.content == "The Picker arm handles"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    stream = _ask(client, PAGE, SUMMARIZE, max_completion_tokens=4, stream=True)
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The Picker arm handles"
    assert chunks[-1].choices[0].finish_reason == "length"
