"""What the LLM simulator answers: plausible text that is a pure function of the request.

A chat answer is extractive, as a cautious summarizer would write it: sentences of the last user
message (of its *material*, the part after a first line ending in ``:``, as in
``"Write a brief from:\\n- ..."``), in the order they appear, at most ``ANSWER_WORDS`` words. A
summary (instructions with no question) is the first full sentence and up to two more; an answer
to a question (a ``?`` in the system messages or that first line) is one sentence. Sentences
sharing the most words with the instructions come first, then the request's hash decides.
Headings (a line of a few words with no full stop) are skipped while there is anything else.

What stays true, online, streamed or in a batch (:mod:`genx_ray.llm.sim._batches`):

- The same request body gives the same answer; requests whose messages say different things get
  different answers (the same text under two instructions may get the same sentences).
- ``usage`` counts words: prompt tokens are the messages' words, completion tokens the answer's;
  streamed chunks (a word each) join to the answer.
- ``max_completion_tokens`` (or ``max_tokens``) cuts the answer at that many words, with
  ``finish_reason: "length"``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

ANSWER_WORDS = 60
ANSWER_SENTENCES = 3
_STOP_WORDS = """a an and are as at be by do does for from how in is it its of on or that the this
to was what when where which who why with about answer page"""
_STOP = frozenset(_STOP_WORDS.split())
_BREAK = re.compile(r"(?<=[.!?])\s+")
_BULLET = re.compile(r"^(?:[-*+#>]+|\d+[.)])\s+")
_LABEL = re.compile(r"^[^:]{1,60}:\s+(?=\S)")  # "- Pricing | Acme: Robots are leased..."


def tokens(text: str) -> int:
    return max(1, len(text.split()))


def content_text(content: Any) -> str:
    """A message's text: its content, or the text parts of a list of parts."""
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP}


def _sentences(material: str) -> list[str]:
    out: list[str] = []
    for line in material.splitlines():
        bare = _BULLET.sub("", line.strip())
        if bare != line.strip():  # a list item: its label is not part of what it says
            bare = _LABEL.sub("", bare)
        out.extend(s.strip() for s in _BREAK.split(bare) if s.strip())
    full = [s for s in out if s[-1] in ".!?" or len(s.split()) > 4]
    return full or out


def _pick(sentences: list[str], instructions: str, seed: bytes) -> list[str]:
    query, question = _words(instructions), "?" in instructions

    def rank(i: int) -> tuple[bool, int, bytes]:
        overlap = len(_words(sentences[i]) & query)
        tie = hashlib.sha256(seed + sentences[i].encode()).digest()
        return (question or i != 0, -overlap, tie)  # a summary leads with the first sentence

    chosen: list[int] = []
    budget, most = ANSWER_WORDS, 1 if question else ANSWER_SENTENCES
    for i in sorted(range(len(sentences)), key=rank):
        size = len(sentences[i].split())
        if chosen and (size > budget or len(chosen) == most):
            continue
        chosen.append(i)
        budget -= size
    return [sentences[i] for i in sorted(chosen)]


def answer(body: dict[str, Any]) -> tuple[str, str]:
    """The answer's text and finish reason."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    users = [content_text(m.get("content")) for m in messages if m.get("role") == "user"]
    prompt = users[-1] if users else ""
    head, colon, rest = prompt.partition(":\n")
    instruction, material = (head, rest) if colon and "\n" not in head else ("", prompt)
    system = " ".join(content_text(m.get("content")) for m in messages if m.get("role") != "user")
    seed = hashlib.sha256(json.dumps([body.get("model"), messages], sort_keys=True).encode())
    sentences = _sentences(material) or _sentences(prompt)
    picked = _pick(sentences, f"{system} {instruction}", seed.digest())
    words = " ".join(picked).split() or ["OK"]
    if len(words) > ANSWER_WORDS:  # one long sentence
        words = [*words[: ANSWER_WORDS - 1], words[ANSWER_WORDS - 1] + "…"]
    text = " ".join(words)
    text = text[0].upper() + text[1:] + ("" if text[-1] in ".!?…" else ".")
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and limit > 0 and len(text.split()) > limit:
        return " ".join(text.split()[:limit]), "length"
    return text, "stop"


def chat_completion(body: dict[str, Any]) -> dict[str, Any]:
    """The ``chat.completion`` object ``POST /v1/chat/completions`` answers for this body."""
    text, finish = answer(body)
    prompt = sum(tokens(content_text(m.get("content"))) for m in body.get("messages") or [])
    usage = {"prompt_tokens": prompt, "completion_tokens": tokens(text),
             "total_tokens": prompt + tokens(text)}  # fmt: skip
    return {
        "id": "chatcmpl-" + hashlib.sha256(text.encode()).hexdigest()[:12],
        "object": "chat.completion", "created": int(time.time()),
        "model": str(body.get("model", "")),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish}],
        "usage": usage,
    }  # fmt: skip


def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    """The list object ``POST /v1/embeddings`` answers: a vector from each input's hash."""
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    dims = int(body.get("dimensions") or 8)
    data = []
    for i, item in enumerate(items):
        digest = hashlib.sha256(json.dumps(item).encode()).digest()
        vector = [(digest[j % len(digest)] - 128) / 128 for j in range(dims)]
        data.append({"object": "embedding", "index": i, "embedding": vector})
    used = sum(tokens(json.dumps(x)) for x in items)
    usage = {"prompt_tokens": used, "total_tokens": used}
    return {"object": "list", "data": data, "model": str(body.get("model", "")), "usage": usage}
