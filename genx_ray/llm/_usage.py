"""What LLM calls cost their run: tokens, calls, retries and an estimated price, added to the
run's record (``usage`` in the run object) and reported in ``llm.usage`` events."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from genx_ray.flow import current_run, current_step
from genx_ray.llm._limits import Booking
from genx_ray.model import ProgressEvent
from genx_ray.store import keys

# Rough public prices (USD per million tokens: input, output) for the cost estimate, and the
# share of them a call through the provider's Batch API pays (batch_discount: 0.5 is half).
PRICES = {"gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6)}
BATCH_DISCOUNT: dict[str, float] = {}  # model -> batch_discount; DEFAULT_BATCH_DISCOUNT else
DEFAULT_BATCH_DISCOUNT = 0.5
USAGE_FIELDS = ("calls", "prompt_tokens", "completion_tokens", "retries")
MODEL_PREFIX = "usage_m:"  # run hash fields usage_m:<model>:<counter>
REPORT_EVERY = 1.0  # seconds between a run's llm.usage events from one process

# run id -> (this process's running totals for the run, when they were last reported); the
# runs of a long-lived process come and go, so only the latest are kept.
_totals: OrderedDict[str, tuple[dict[str, int], float]] = OrderedDict()
_KEEP = 4096


def cost_nanos(model: str, prompt: int, completion: int, *, batch: bool = False) -> int:
    """The estimated cost in nano-USD: whole numbers (HINCRBY), fine enough that thousands of
    small calls add up without drift. Prices are USD per 1M tokens, i.e. micro-USD per token.
    ``batch``: at the model's batch price (its ``batch_discount`` of the online one)."""
    price_in, price_out = PRICES.get(model, (0.0, 0.0))
    share = BATCH_DISCOUNT.get(model, DEFAULT_BATCH_DISCOUNT) if batch else 1.0
    return round((prompt * price_in + completion * price_out) * 1000 * share)


def batch_usage(results: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """What answered batch requests cost their run, at the batch price: the run record's
    counters to add (as :func:`account` books an online call's)."""
    fields: Counter[str] = Counter()
    for result in results:
        body = result.get("body")
        if result.get("status") != 200 or not isinstance(body, dict):
            continue
        usage = body.get("usage") or {}
        model = str(body.get("model") or "")
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        cost = cost_nanos(model, prompt, completion, batch=True)
        by_model = f"{MODEL_PREFIX}{model}:"
        for name, value in (("calls", 1), ("prompt_tokens", prompt),
                            ("completion_tokens", completion), ("cost_nanos", cost)):  # fmt: skip
            fields[f"usage_{name}"] += value
            fields[by_model + name] += value
        fields[by_model + "batch_calls"] += 1
        fields["usage_batch_calls"] += 1
    return dict(fields)


def account(model: str, prompt: int, completion: int, retries: int) -> Booking | None:
    """A call's usage, to book with its slot's release: added to its run's record. Its run
    hears of it in a ``progress`` event of kind ``llm.usage`` (running totals of this process,
    at most one a second). None outside a run."""
    ctx = current_run()
    if ctx is None:
        return None
    totals, sent = _totals.pop(ctx.run_id, (dict.fromkeys(USAGE_FIELDS, 0), 0.0))
    for name, value in zip(USAGE_FIELDS, (1, prompt, completion, retries), strict=True):
        totals[name] += value
    now = time.monotonic()
    if now - sent >= REPORT_EVERY:
        sent = now
        publish("llm.usage", dict(totals))
    _totals[ctx.run_id] = (totals, sent)
    while len(_totals) > _KEEP:
        _totals.popitem(last=False)
    cost = cost_nanos(model, prompt, completion)
    by_model = f"{MODEL_PREFIX}{model}:"
    return keys.run(ctx.run_id), {
        "usage_calls": 1, "usage_prompt_tokens": prompt, "usage_completion_tokens": completion,
        "usage_retries": retries, "usage_cost_nanos": cost,
        # ...and by model, for usage by model (genx_ray.explore._frames.usage_frame)
        by_model + "calls": 1, by_model + "prompt_tokens": prompt,
        by_model + "completion_tokens": completion, by_model + "cost_nanos": cost,
    }  # fmt: skip


def publish(kind: str, data: dict[str, Any]) -> None:
    """A ``progress`` event of the LLM layer's (``llm.*``) to the calling step's run, if any."""
    ctx = current_run()
    if ctx is not None:
        ctx.writer.emit(ProgressEvent(run_id=ctx.run_id, kind=kind, data=data, step=current_step()))
