"""``Component.map(items, llm="batch")``: a map whose LLM calls travel through the provider's
Batch API (half the price, its own limits) instead of one HTTP call each.

How a batch map runs, in rounds. The items run their bodies as in any map; an LLM call made
through :mod:`genx_ray.llm` is not sent: the transport asks the round (:func:`current_batch`)
for its answer, by a stable key (the item's step and attempt, the request, its rank among equal
requests there); a call the journal answers returns at once, any other is collected and its
item waits. Once every item has ended or waits, the round's calls go to the provider as batches
(a file each, one endpoint and model per file, at most ``REQUESTS_PER_FILE`` requests and
``BYTES_PER_FILE`` bytes) and the run parks like a durable sleep (``waiting``, no host held).
The timer service wakes it at a growing interval (``GENX_BATCH_POLL_MS`` doubling up to
``GENX_BATCH_POLL_MAX_MS``); the map looks at its batches, parks again while they run, and when
they are done reads the output and error files, journals each response under its key (with the
usage, at the batch price, in one transaction) and runs the waiting items again: they get their
answers from the journal and end, or make their next call (the next round). A failed request
fails its call: the component's retry policy retries the item (its retry's call is another
request, in the next round) and in the end it gets a :class:`StepError` in its place.

What stays true across crashes: a round's record (``keys.batches``, ``round:<map>``) is written
before ``batches.create`` and names each batch once it exists; an attempt that finds a record
still ``creating`` looks its batches up by their metadata (run, map, round, part) before making
one, so a round creates each batch once however often the run restarts. Its output is read
until the record says ``read``, written with the responses in one transaction.

The provider side (files, batches, the batch price) is :mod:`genx_ray.llm`'s: the flow is given
it (:func:`use_batches`), as it is given its :class:`~genx_ray.flow.Placement`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, cast

from genx_ray.flow._context import RunContext, _batch_round, current_step
from genx_ray.flow._placement import Settle
from genx_ray.flow._steps import call_step
from genx_ray.flow._waits import Parked
from genx_ray.model import (
    RunCancelled,
    RunWaitingEvent,
    Settings,
    StepError,
    StepRef,
    UserError,
    canonical_hash,
    item_step_id,
)
from genx_ray.store import keys
from genx_ray.store import scripts as lua

if TYPE_CHECKING:
    from genx_ray.flow._steps import StepSpec

log = logging.getLogger("genx_ray.batching")
REQUESTS_PER_FILE = 50_000  # the provider's limits on one batch's input file
BYTES_PER_FILE = 200 * 1024 * 1024
ENDPOINTS = ("/chat/completions", "/embeddings", "/completions", "/responses")
DONE = frozenset({"completed", "failed", "expired", "cancelled"})
KEEP_SECONDS = 30 * 24 * 3600  # a run's batch records outlive any completion window


@dataclass(frozen=True)
class BatchCall:
    """One LLM request a round collected: what a line of the batch's input file says."""

    key: str  # the custom_id
    base_url: str  # up to and with /v1
    api_key: str
    path: str  # from /v1 on: the line's url and the batch's endpoint
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    def line(self) -> bytes:
        line = {"custom_id": self.key, "method": "POST", "url": self.path, "body": self.body}
        return json.dumps(line, separators=(",", ":")).encode() + b"\n"


class Batches(Protocol):
    """The provider's Batch API, as the flow needs it (:mod:`genx_ray.llm` implements it)."""

    async def create(
        self, calls: Sequence[BatchCall], *, metadata: dict[str, str], completion_window: str
    ) -> str:
        """Upload the calls as a file and create a batch of it; its id."""
        ...

    async def find(self, base_url: str, api_key: str, metadata: dict[str, str]) -> str | None:
        """The id of a batch created with this metadata, if the provider has one."""
        ...

    async def retrieve(self, base_url: str, api_key: str, batch_id: str) -> dict[str, Any]:
        """The batch as the provider shows it (status, request_counts, file ids...)."""
        ...

    async def results(
        self, base_url: str, api_key: str, batch: Mapping[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """custom_id -> ``{"status": HTTP status, "body": the response}``, from the batch's
        output and error files (a request in neither was not run)."""
        ...

    async def cancel(self, base_url: str, api_key: str, batch_id: str) -> None:
        """Cancel a batch."""
        ...

    def usage(self, results: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
        """What the results cost their run, at the batch price: run record counters to add."""
        ...

    def key_for(self, key_hash: str) -> str | None:
        """The API key this process has whose :func:`key_hash` is ``key_hash``, if any (a
        round's record keeps only the hash of the key its calls used, never the key)."""
        ...


def key_hash(api_key: str) -> str:
    """What a round's record keeps of the API key its calls used: enough to know the key
    again, nothing to use it with."""
    return hashlib.sha256(b"genx-batch-key\n" + api_key.encode()).hexdigest()[:32]


_batches: Batches | Callable[[], Batches] | None = None


def use_batches(api: Batches | Callable[[], Batches]) -> None:
    """Send ``llm="batch"`` maps' calls through ``api`` (or what the factory makes, on first
    use) from now on, in this process."""
    global _batches
    _batches = api


def batches() -> Batches:
    global _batches
    if _batches is None:
        raise UserError('llm="batch" needs the provider side: import genx_ray (it installs it)')
    if callable(_batches) and not hasattr(_batches, "create"):
        _batches = _batches()
    return _batches  # type: ignore[return-value]


class BatchRound:
    """One pass over a batch map's items: the answers known, the calls collected."""

    def __init__(self, answers: Mapping[str, dict[str, Any]], fresh: set[str]) -> None:
        self.answers = answers
        self.fresh = fresh  # the keys of answers read in this attempt (the others: replayed)
        self.failed_now: set[str] = set()  # steps a fresh failed answer was given to
        self.calls: dict[str, BatchCall] = {}
        self.waiting: set[int] = set()  # items waiting on a call
        self.changed = asyncio.Event()
        self._seen: Counter[str] = Counter()

    def key(self, path: str, body: Mapping[str, Any]) -> str:
        """A request's stable key: its item's step (a retry's attempt has its own), the
        request, and its rank among equal requests there."""
        step = current_step()
        base = canonical_hash(step.id if step is not None else "", path, body)
        rank = self._seen[base]
        self._seen[base] += 1
        return "gx-" + hashlib.sha256(f"{base}:{rank}".encode()).hexdigest()[:32]

    def answer(self, key: str) -> dict[str, Any] | None:
        answer = self.answers.get(key)
        if answer is not None and key in self.fresh and int(answer.get("status", 0)) >= 400:
            step = current_step()
            self.failed_now.add(step.id if step is not None else "")
        return answer

    def announces(self, scope: str) -> bool:
        """Whether a failure in ``scope`` (a step's attempt) is news: a failed answer read
        now, not one replayed (its ``step.retrying`` was told when it was read)."""
        return scope in self.failed_now

    async def wait(self, call: BatchCall) -> NoReturn:
        """Collect ``call`` and wait: the map parks the run (and cancels this) once every item
        has ended or waits."""
        self.calls[call.key] = call
        item = _item.get()
        if item is not None:
            self.waiting.add(item)
        self.changed.set()
        await asyncio.get_running_loop().create_future()  # never set: cancelled by the map
        raise AssertionError("unreachable")


_item: ContextVar[int | None] = ContextVar("genx_batch_item", default=None)


@contextmanager
def _in_round(rnd: BatchRound) -> Iterator[None]:
    token = _batch_round.set(rnd)
    try:
        yield
    finally:
        _batch_round.reset(token)


# -- a round's record: keys.batches(run), field round:<map step> -------------------------------


@dataclass
class Record:
    round: int
    state: str  # creating | open | read | cancelled
    parts: list[dict[str, Any]]  # {"id", "base_url", "requests"}
    polls: int = 0

    def dumps(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))


async def _load(ctx: RunContext, map_id: str) -> tuple[dict[str, dict[str, Any]], Record | None]:
    raw = cast(dict[str, str], await ctx.redis.hgetall(keys.batches(ctx.run_id)))
    answers = {k[2:]: json.loads(v) for k, v in raw.items() if k.startswith("r:")}
    record = raw.get(f"round:{map_id}")
    return answers, Record(**json.loads(record)) if record else None


async def _save(ctx: RunContext, map_id: str, record: Record) -> None:
    key = keys.batches(ctx.run_id)
    await ctx.redis.hset(key, f"round:{map_id}", record.dumps())
    await ctx.redis.expire(key, KEEP_SECONDS)


def _parts(calls: Sequence[BatchCall]) -> list[list[BatchCall]]:
    """The round's calls as batches: one provider, endpoint and model each, within the limits
    of one input file; in a stable order (a restarted attempt makes the same parts)."""
    groups: dict[tuple[str, str, str, str], list[BatchCall]] = {}
    for call in sorted(calls, key=lambda c: c.key):
        groups.setdefault((call.base_url, call.api_key, call.path, call.model), []).append(call)
    parts: list[list[BatchCall]] = []
    for group in groups.values():
        part: list[BatchCall] = []
        size = 0
        for call in group:
            n = len(call.line())
            if part and (len(part) >= REQUESTS_PER_FILE or size + n > BYTES_PER_FILE):
                parts.append(part)
                part, size = [], 0
            part.append(call)
            size += n
        parts.append(part)
    return parts


# -- the map ---------------------------------------------------------------------------------------


async def map_batched(
    spec: StepSpec, ctx: RunContext, map_id: str, todo: Sequence[Any], left: Sequence[int],
    settle: Settle, report: Callable[[dict[str, Any]], None], completion_window: str,
) -> None:  # fmt: skip
    """The items ``left`` of a map in a run, their LLM calls in batches (see the module)."""
    api = batches()
    answers, record = await _load(ctx, map_id)
    try:
        await _rounds(spec, ctx, map_id, todo, left, settle, report, completion_window, api,
                      answers, record)  # fmt: skip
    except (asyncio.CancelledError, RunCancelled, Parked):
        if ctx.cancel_requested:  # the run is cancelled: so are its open batches
            await asyncio.shield(cancel_batches(ctx.redis, ctx.run_id))
        raise


async def _rounds(
    spec: StepSpec, ctx: RunContext, map_id: str, todo: Sequence[Any], left: Sequence[int],
    settle: Settle, report: Callable[[dict[str, Any]], None], completion_window: str,
    api: Batches, answers: dict[str, dict[str, Any]], record: Record | None,
) -> None:  # fmt: skip
    remaining = list(left)
    fresh: set[str] = set()
    if remaining and record is not None and record.state == "open":
        # A poll: with the key this process has (its own OPENAI_API_KEY, if it is the one the
        # calls used), the batches are looked at before any item runs again.
        keys_here = {p["base_url"]: api.key_for(p.get("key_hash", "")) for p in record.parts}
        if all(k is not None for k in keys_here.values()):
            creds = {b: str(k) for b, k in keys_here.items()}
            await _look(ctx, spec, map_id, api, record, creds, report, answers, fresh)
    while remaining:
        rnd = await _pass(spec, ctx, map_id, todo, remaining, settle, answers, fresh)
        remaining = sorted(rnd.waiting)
        await ctx.writer.flush()  # the items that ended: journaled before the run parks
        if not rnd.calls:
            return
        if record is not None and record.state == "open":
            creds = {c.base_url: c.api_key for c in rnd.calls.values()}
            await _look(ctx, spec, map_id, api, record, creds, report, answers, fresh)
            continue  # the waiting items again, with their answers
        record = await _create(ctx, api, map_id, list(rnd.calls.values()), record,
                               completion_window)  # fmt: skip
        report(_shown(record, [{"id": p["id"], "status": "validating"} for p in record.parts]))
        raise _parked(ctx, spec, map_id, record)


async def _look(
    ctx: RunContext, spec: StepSpec, map_id: str, api: Batches, record: Record,
    creds: Mapping[str, str], report: Callable[[dict[str, Any]], None],
    answers: dict[str, dict[str, Any]], fresh: set[str],
) -> None:  # fmt: skip
    """Look at an open round's batches: park again while they run; once done, read their
    output and error files (the record ``read`` with the responses, in one transaction)."""
    infos = [
        await api.retrieve(p["base_url"], creds.get(p["base_url"], ""), p["id"])
        for p in record.parts
    ]  # fmt: skip
    report(_shown(record, infos))
    failed = [i for i in infos if i.get("status") == "failed"]
    if failed:
        raise UserError(f"the provider failed batch {failed[0].get('id')}: {_errors(failed[0])}")
    if not all(i.get("status") in DONE for i in infos):
        record.polls += 1
        await _save(ctx, map_id, record)
        raise _parked(ctx, spec, map_id, record)
    results: dict[str, dict[str, Any]] = {}
    for part, info in zip(record.parts, infos, strict=True):
        results.update(await api.results(part["base_url"], creds.get(part["base_url"], ""), info))
    record.state = "read"
    await _read(ctx, map_id, record, results, api.usage(results))
    answers.update(results)
    fresh.update(results)


async def _pass(
    spec: StepSpec, ctx: RunContext, map_id: str, todo: Sequence[Any], indexes: Sequence[int],
    settle: Settle, answers: Mapping[str, dict[str, Any]], fresh: set[str],
) -> BatchRound:  # fmt: skip
    """Run the items until each has ended or waits on a call; the round's calls."""
    rnd = BatchRound(answers, fresh)
    ended = 0
    error: list[BaseException] = []

    async def one(i: int) -> None:
        nonlocal ended
        _item.set(i)
        try:
            step_id = item_step_id(map_id, i, spec.name)
            try:
                value = await call_step(spec, ctx, step_id, (todo[i],), {}, quiet=True)
            except StepError as exc:
                settle(i, exc, False)
            else:
                settle(i, value, True)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # fail_fast, a cancel, a nondeterminism...
            error.append(exc)
        finally:
            ended += 1
            rnd.changed.set()

    with _in_round(rnd):
        tasks = [asyncio.create_task(one(i)) for i in indexes]
    try:
        while not error:
            if ended + len(rnd.waiting) >= len(tasks):
                for _ in range(3):  # let calls made in the same instant (gather) join the round
                    await asyncio.sleep(0)
                if ended + len(rnd.waiting) >= len(tasks):
                    break
            rnd.changed.clear()
            await rnd.changed.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if error:
        raise error[0]
    return rnd


async def _create(
    ctx: RunContext, api: Batches, map_id: str, calls: list[BatchCall], record: Record | None,
    window: str,
) -> Record:  # fmt: skip
    """The round's batches, each created once: the record first (``creating``), then each
    batch, looked up by its metadata when an earlier attempt may have made it."""
    parts = _parts(calls)
    again = record is not None and record.state == "creating"
    if record is None or not again:
        n = 1 if record is None else record.round + 1
        record = Record(n, "creating", [{} for _ in parts])
        await _save(ctx, map_id, record)
    if len(record.parts) != len(parts):  # an attempt that collected otherwise: start over
        record.parts = [{} for _ in parts]
    for p, part in enumerate(parts):
        if record.parts[p].get("id"):
            continue
        first = part[0]
        metadata = {"genx_run": ctx.run_id, "genx_map": map_id[-500:],
                    "genx_round": str(record.round), "genx_part": str(p)}  # fmt: skip
        batch_id = None
        if again:
            batch_id = await api.find(first.base_url, first.api_key, metadata)
        if batch_id is None:
            batch_id = await api.create(part, metadata=metadata, completion_window=window)
        record.parts[p] = {
            "id": batch_id, "base_url": first.base_url, "requests": len(part),
            "key_hash": key_hash(first.api_key),
        }  # fmt: skip
        await _save(ctx, map_id, record)
    record.state = "open"
    await _save(ctx, map_id, record)
    return record


async def _read(
    ctx: RunContext, map_id: str, record: Record, results: Mapping[str, Any],
    usage: Mapping[str, int],
) -> None:  # fmt: skip
    """The round's responses, its usage and its record ``read``: all or nothing."""
    args: list[Any] = [f"round:{map_id}", record.dumps(), KEEP_SECONDS, len(results)]
    for k, v in results.items():
        args += [f"r:{k}", json.dumps(v)]
    for name, amount in usage.items():
        args += [name, amount]
    await lua.BATCH_READ(ctx.redis, [keys.batches(ctx.run_id), keys.run(ctx.run_id)], args)


def _parked(ctx: RunContext, spec: StepSpec, map_id: str, record: Record) -> Parked:
    settings = Settings.current()
    delay = min(settings.batch_poll_ms * 2 ** min(record.polls, 30), settings.batch_poll_max_ms)
    due = time.time() + delay / 1000
    ref = StepRef(id=map_id, name=f"{spec.name}.map")
    event = RunWaitingEvent(run_id=ctx.run_id, reason="batch", until=due, step=ref)
    fields = {"wait_kind": "batch", "wait_until": repr(due)}
    return Parked(map_id, "batch", [event], fields, due)


def _shown(record: Record, infos: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What a ``progress`` event of kind ``map`` says of the round's batches."""
    counts: Counter[str] = Counter()
    for info in infos:
        for name, value in (info.get("request_counts") or {}).items():
            counts[name] += int(value or 0)
    statuses = sorted({str(i.get("status")) for i in infos})
    return {
        "round": record.round, "ids": [p.get("id") for p in record.parts],
        "status": statuses[0] if len(statuses) == 1 else ",".join(statuses),
        "request_counts": dict(counts),
    }  # fmt: skip


def _errors(info: Mapping[str, Any]) -> str:
    data = ((info.get("errors") or {}).get("data")) or []
    return "; ".join(str(e.get("message")) for e in data[:3]) or "no reason given"


async def cancel_batches(redis: Any, run_id: str) -> int:
    """Cancel the open batches of a run's batch maps (a cancelled run); how many were. A batch
    this process cannot cancel (it has not the API key its calls used, or the provider refused)
    is logged with the reason, and left to its completion window."""
    raw = cast(dict[str, str], await redis.hgetall(keys.batches(run_id)))
    api = batches()
    n = 0
    for field, value in raw.items():
        if not field.startswith("round:"):
            continue
        record = Record(**json.loads(value))
        if record.state in ("read", "cancelled"):
            continue
        for part in record.parts:
            if not part.get("id"):
                continue
            api_key = api.key_for(part.get("key_hash", ""))
            if api_key is None:
                log.warning("run %s was cancelled; its batch %s is not: this process has not "
                            "the API key its calls used", run_id, part["id"])  # fmt: skip
                continue
            try:
                await api.cancel(part["base_url"], api_key, part["id"])
                n += 1
            except Exception as exc:  # ended already, or the provider refused: said, not hidden
                log.warning("run %s was cancelled; cancelling its batch %s failed: %s: %s",
                            run_id, part["id"], type(exc).__name__, exc)  # fmt: skip
        record.state = "cancelled"
        await redis.hset(keys.batches(run_id), field, record.dumps())
    return n
