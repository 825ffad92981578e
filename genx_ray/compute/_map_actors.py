"""``Component.map`` over the Ray cluster: items in chunks to async actors placed on the nodes.

One Ray task per item is the wrong grain for LLM calls (a round trip and a process each), so a
placed component's map goes to *map actors* instead: detached async actors, one per CPU of a
node (up to four), shared by every run, each running many items at once. The run host plans how
many items each node may run at a time (its share of ``concurrency``, capped by what the node's
resources allow for the component's ``resources``/``num_cpus``, only on nodes with its
``node_labels``), then keeps that many running per node, in small chunks, and as many more
waiting at the actors' gates: a slot that frees takes the next item at once. The map actors also
hold each node's resources as a shared budget (split evenly between them), so maps of different
runs on the same node never exceed the node's capacity together. The run host journals every
finished item, so a restarted run does not redo it.

Inside the actor an item runs with its run's context: ``publish``, LLM usage and LLM events
reach the run's stream, fenced by the run's attempt like every other write. Each remote call
carries the map's trace context (the chunk's span, and its items' LLM calls, join the run's
trace) and brings back what the chunk recorded for metrics, added to the run host's
(:meth:`genx_ray.observe.Observer.remote`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from genx_ray.flow import RunContext, StepSpec, cache_key, call_direct, item_error, item_scope
from genx_ray.model import (
    DEFAULT_TENANT,
    ErrorInfo,
    JournalEntry,
    StepError,
    StepFailedEvent,
    StepRef,
    Unplaceable,
    UserError,
    canonical_hash,
    dump_value,
    item_step_id,
)
from genx_ray.observe import Carried, flush, setup
from genx_ray.observe import observer as current_observer

if TYPE_CHECKING:
    from genx_ray.store import BatchWriter

log = logging.getLogger("genx_ray.map_actors")

CHUNK_MAX = 16  # items per remote call, at most: few calls, yet slots refill promptly
# Map actors per node: one per CPU, up to this many. An LLM call costs the client ~2-3 ms of
# CPU (the SDK, HTTP): one process tops out near 400 calls/s, so a node uses its cores.
MAX_ACTORS_PER_NODE = 4
IDLE_SECONDS = 600.0  # a map actor nobody used for this long leaves
_ACTOR_PREFIX = "genx-map-"
# The run a chunk's items belong to: (run id, workflow, attempt, tenant); the tenant keys the
# component cache, so a map item never reads another tenant's cached result.
RunTuple = tuple[str, str, int, str]

# What an item comes back as: (index, ok, encoded value or error as a dict).
Outcome = tuple[int, bool, Any]
# What a chunk comes back as: its items' outcomes, and what it recorded for metrics.
ChunkResult = tuple[list[Outcome], Carried]


def requirements(spec: StepSpec) -> dict[str, float]:
    """What one item of the component takes on its node."""
    need = {r: q for r, q in spec.resources.items() if q > 0}
    if spec.num_cpus:
        need["CPU"] = spec.num_cpus
    return need


def plan(
    spec: StepSpec, concurrency: int, nodes: Sequence[Mapping[str, Any]]
) -> dict[str, tuple[int, dict[str, float]]]:
    """node id -> (items it may run at once, its resources): ``concurrency`` spread evenly over
    the alive ``nodes`` (as ``ray.nodes()`` lists them) with the component's labels, none above
    what its resources allow."""
    need = requirements(spec)
    caps: dict[str, int] = {}
    resources: dict[str, dict[str, float]] = {}
    for node in nodes:
        labels = node.get("Labels") or {}
        if not node.get("Alive") or any(labels.get(k) != v for k, v in spec.node_labels.items()):
            continue
        have: dict[str, float] = node.get("Resources") or {}
        cap = min((int(have.get(r, 0.0) / q + 1e-9) for r, q in need.items()), default=concurrency)
        if cap >= 1:
            caps[node["NodeID"]], resources[node["NodeID"]] = cap, have
    if not caps:
        raise UserError(
            f"{spec.name}.map: no alive node offers {need or 'room'}"
            + (f" with labels {dict(spec.node_labels)}" if spec.node_labels else "")
        )
    slots = dict.fromkeys(caps, 0)
    left = concurrency
    while left > 0:  # one slot at a time, round robin: an even spread within each node's cap
        open_nodes = [n for n in caps if slots[n] < caps[n]]
        if not open_nodes:
            break
        for node_id in open_nodes[:left]:
            slots[node_id] += 1
            left -= 1
    return {n: (s, resources[n]) for n, s in slots.items() if s > 0}


class _Units:
    """A node's resources as a budget shared by every map on the node."""

    def __init__(self, total: Mapping[str, float]) -> None:
        self.free = dict(total)
        self.changed = asyncio.Condition()

    def _fits(self, need: Mapping[str, float]) -> bool:
        return all(self.free.get(r, 0.0) >= q - 1e-9 for r, q in need.items())

    async def take(self, need: Mapping[str, float]) -> None:
        if not need:
            return  # nothing to count (remote=True alone): no lock, no wake-ups
        async with self.changed:
            await self.changed.wait_for(lambda: self._fits(need))
            for r, q in need.items():
                self.free[r] = self.free.get(r, 0.0) - q

    async def give(self, need: Mapping[str, float]) -> None:
        if not need:
            return
        async with self.changed:
            for r, q in need.items():
                self.free[r] = self.free.get(r, 0.0) + q
            self.changed.notify_all()


class MapActor:
    """One per node (a detached async actor): runs the items of any run's maps."""

    def __init__(self, resources: Mapping[str, float]) -> None:
        from genx_ray.model import Settings
        from genx_ray.store import BatchWriter, async_redis, resolve_redis_url

        self.observer = setup("map-actor")
        self.units = _Units(resources)
        self.redis = async_redis(resolve_redis_url())
        self.writes: BatchWriter = BatchWriter(self.redis, maxlen=Settings.current().stream_maxlen)
        # map key -> (the spec, to run here; its map's gate on this node; an item's needs)
        self.components: OrderedDict[str, tuple[StepSpec, asyncio.Semaphore, dict[str, float]]] = (
            OrderedDict()
        )
        self.contexts: OrderedDict[tuple[str, int], RunContext] = OrderedDict()
        self.last_used = time.monotonic()
        self.busy = 0
        self._reaper = asyncio.get_event_loop().create_task(self._leave_when_idle())

    async def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    async def run(
        self, key: str, component_ref: list[Any], slots: int, run: RunTuple | None,
        map_id: str, items: Sequence[tuple[int, Any]], trace: str | None = None,
    ) -> ChunkResult:  # fmt: skip
        """Run a chunk of one map's items, at most ``slots`` of that map at once on this node.
        ``trace``: the map's span, the parent of this chunk's."""
        self.busy += 1
        try:
            spec, gate, need = await self._component(key, component_ref, slots)
            attributes = {"genx.step.id": map_id, "genx.map.chunk_items": len(items),
                          "genx.run.id": run[0] if run else ""}  # fmt: skip
            with self.observer.remote(trace, "chunk", spec.name, attributes) as observed:
                outcomes = await self._chunk(spec, gate, need, run, map_id, items)
            return outcomes, observed.carried
        finally:
            self.busy -= 1
            self.last_used = time.monotonic()

    async def _chunk(
        self, spec: StepSpec, gate: asyncio.Semaphore, need: dict[str, float],
        run: RunTuple | None, map_id: str, items: Sequence[tuple[int, Any]],
    ) -> list[Outcome]:  # fmt: skip
        ctx = self._context(run) if run is not None else None
        ended = self.observer.item_ended

        async def one(index: int, item: Any) -> Outcome:
            async with gate:
                await self.units.take(need)
                step_id = item_step_id(map_id, index, spec.name)
                started = time.perf_counter()
                try:
                    with item_scope(ctx, StepRef(id=step_id, name=spec.name)):
                        value = await call_direct(spec, (item,), {}, step_id)
                    ended(spec.name, step_id, time.perf_counter() - started)
                    return index, True, spec.codec.encode(value)
                except StepError as exc:
                    ended(spec.name, step_id, time.perf_counter() - started, exc.error_type)
                    error = {"type": exc.error_type, "message": exc.error_message,
                             "attempts": exc.attempt}  # fmt: skip
                    return index, False, error
                finally:
                    await self.units.give(need)

        cached: list[Outcome] = []
        cache_keys: dict[int, str] = {}
        if spec.cache_ttl:  # one read for the chunk; hits do not run
            tenant = run[3] if run is not None else DEFAULT_TENANT  # the cache is per tenant
            cache_keys = {i: cache_key(spec, (item,), {}, tenant) for i, item in items}
            cached, items = await self._cached(cache_keys, items)
        outcomes = await asyncio.gather(*(one(i, item) for i, item in items))
        if spec.cache_ttl:
            await self._cache(cache_keys, int(spec.cache_ttl * 1000), outcomes)
        if ctx is not None:
            await ctx.writer.flush()  # its events are stored before its results go back
        return cached + list(outcomes)

    async def _cached(
        self, cache_keys: Mapping[int, str], items: Sequence[tuple[int, Any]]
    ) -> tuple[list[Outcome], list[tuple[int, Any]]]:
        """The items the cache answers, as outcomes, and the others. One pipeline of GETs, not an
        MGET: the keys live in many slots of a Redis Cluster."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for i, _ in items:
                pipe.get(cache_keys[i])
            found = await pipe.execute()
        hits: list[Outcome] = []
        misses: list[tuple[int, Any]] = []
        for (i, item), raw in zip(items, found, strict=True):
            if raw is None:
                misses.append((i, item))
            else:
                hits.append((i, True, json.loads(raw)))
        return hits, misses

    async def _cache(
        self, cache_keys: Mapping[int, str], ttl_ms: int, outcomes: Sequence[Outcome]
    ) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for i, ok, encoded in outcomes:
                if ok:
                    pipe.set(cache_keys[i], dump_value(encoded), px=ttl_ms)
            await pipe.execute()

    async def _component(
        self, key: str, ref: list[Any], slots: int
    ) -> tuple[StepSpec, asyncio.Semaphore, dict[str, float]]:
        cached = self.components.get(key)
        if cached is None:
            placed: StepSpec = await ref[0]
            # The item runs here, in this process: the placement that brought it here is spent.
            cached = self.components[key] = (
                placed.here(),
                asyncio.Semaphore(slots),
                requirements(placed),
            )
            while len(self.components) > 64:
                self.components.popitem(last=False)
        self.components.move_to_end(key)
        return cached

    def _context(self, run: RunTuple) -> RunContext:
        run_id, workflow, attempt, tenant = run
        ctx = self.contexts.get((run_id, attempt))
        if ctx is None:
            writer = self.writes.writer(run_id, attempt)
            ctx = self.contexts[(run_id, attempt)] = RunContext(
                run_id, workflow, attempt, self.redis, writer, {}, tenant=tenant
            )
            while len(self.contexts) > 32:
                old = self.contexts.popitem(last=False)[1]
                asyncio.get_event_loop().create_task(old.writer.close())
        self.contexts.move_to_end((run_id, attempt))
        return ctx

    async def _leave_when_idle(self) -> None:
        import ray

        while True:
            await asyncio.sleep(min(IDLE_SECONDS / 4, 60.0))
            if self.busy == 0 and time.monotonic() - self.last_used > IDLE_SECONDS:
                await asyncio.to_thread(flush)
                ray.actor.exit_actor()  # type: ignore[no-untyped-call]


def actors_per_node(resources: Mapping[str, float]) -> int:
    return max(1, min(MAX_ACTORS_PER_NODE, int(resources.get("CPU", 1.0))))


def _pool_actor(
    node_id: str, index: int, resources: Mapping[str, float], fresh: bool = False
) -> Any:
    """A map actor of the node, created if there is none (by whichever run asks first). The
    node's resources are split evenly between its actors, each holding its share as a budget:
    together they never exceed the node's capacity."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from genx_ray.compute._bootstrap import NAMESPACE

    name = f"{_ACTOR_PREFIX}{node_id[:24]}-{index}"
    share = {r: q / actors_per_node(resources) for r, q in resources.items()}
    if fresh:
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    options = {
        "name": name, "namespace": NAMESPACE, "get_if_exists": True, "lifetime": "detached",
        "num_cpus": 0, "max_concurrency": 4096, "max_restarts": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
    }  # fmt: skip
    return ray.remote(MapActor).options(**options).remote(share)


async def map_on_cluster(
    spec: StepSpec,
    todo: Sequence[Any],
    indexes: Sequence[int],
    *,
    concurrency: int,
    ctx: RunContext | None,
    map_id: str,
    on_result: Callable[[int, Any, bool], None],
) -> None:
    """Run ``spec`` on ``todo[i]`` for each of ``indexes`` across the cluster.

    ``on_result(i, value or StepError, ok)`` is called for each item as its chunk returns; in
    a run, each chunk's items are journaled before that.
    """
    import ray

    from genx_ray.compute._bootstrap import ensure_ray

    if not indexes:
        return
    await asyncio.to_thread(ensure_ray)  # starting a local Ray takes seconds: not on the loop
    placement = plan(spec, concurrency, ray.nodes())  # type: ignore[no-untyped-call]
    try:
        component_ref = ray.put(spec)
    except Exception as exc:  # cloudpickle: a lock, a client, an open file in its closure...
        raise Unplaceable(f"{type(exc).__name__}: {exc}") from exc
    key = f"{spec.name}:{secrets.token_hex(8)}"
    run = (ctx.run_id, ctx.workflow, ctx.attempt, ctx.tenant) if ctx is not None else None
    observer = ctx.observer if ctx is not None else current_observer()
    trace = observer.context()  # the map's: each chunk's observation is its child
    pending = deque(indexes)

    async def lane(
        node_id: str, index: int, slots: int, resources: dict[str, float], chunk: int
    ) -> None:
        actor = _pool_actor(node_id, index, resources)
        retried = False
        while pending:
            batch = [pending.popleft() for _ in range(min(chunk, len(pending)))]
            ref = actor.run.remote(
                key, [component_ref], slots, run, map_id, [(i, todo[i]) for i in batch], trace
            )
            try:
                outcomes, recorded = await ref
            except asyncio.CancelledError:
                ray.cancel(ref)
                raise
            except ray.exceptions.RayActorError:
                pending.extendleft(reversed(batch))  # another lane (or a fresh actor) takes them
                if retried or not _alive(node_id):
                    log.warning("map %s: node %s lost; its items go elsewhere", map_id, node_id)
                    return
                actor, retried = _pool_actor(node_id, index, resources, fresh=True), True
                continue
            observer.absorb(recorded)  # its LLM calls and steps count here, where the run is
            # Journal them while the next chunk is already on its way.
            tg.create_task(_deliver(spec, ctx, map_id, todo, outcomes, on_result))

    async with asyncio.TaskGroup() as tg:
        for node_id, (node_slots, resources) in placement.items():
            actors = min(actors_per_node(resources), node_slots)
            for index in range(actors):  # the node's slots, shared out between its actors
                slots = node_slots // actors + (1 if index < node_slots % actors else 0)
                chunk = max(1, min(CHUNK_MAX, slots // 4))
                # Twice the lanes its slots take: a whole next wave of items waits at the
                # actor's gate, so a slot that frees starts the next item at once, not after
                # its chunk's round trip to the run host (the chunk boundary).
                for _ in range(2 * math.ceil(slots / chunk)):
                    tg.create_task(lane(node_id, index, slots, resources, chunk))
    if pending:
        raise UserError(f"{spec.name}.map: every node that could run it was lost")


async def _deliver(
    spec: StepSpec, ctx: RunContext | None, map_id: str, todo: Sequence[Any],
    outcomes: list[Outcome], on_result: Callable[[int, Any, bool], None],
) -> None:  # fmt: skip
    entries: list[tuple[str, str]] = []
    failures: list[StepFailedEvent] = []
    delivered: list[tuple[int, Any, bool]] = []
    for index, ok, payload in outcomes:
        step_id = item_step_id(map_id, index, spec.name)
        input_hash = canonical_hash((todo[index],), {})
        if ok:
            entry = JournalEntry(spec.name, input_hash, value=payload)
            delivered.append((index, spec.codec.decode(payload), True))
        else:
            entry = JournalEntry(spec.name, input_hash, error=payload)
            delivered.append((index, item_error(spec, step_id, payload), False))
            if ctx is not None:  # as a map on the run's loop says of its failed items
                ref = StepRef(id=step_id, name=spec.name, attempt=int(payload.get("attempts", 1)))
                error = ErrorInfo(type=payload["type"], message=payload["message"])
                failures.append(StepFailedEvent(run_id=ctx.run_id, step=ref, error=error))
        entries.append((step_id, entry.dumps()))
    if ctx is not None:
        await ctx.writer.commit(failures, entries)
    for index, value, ok in delivered:
        on_result(index, value, ok)


def _alive(node_id: str) -> bool:
    import ray

    nodes = ray.nodes()  # type: ignore[no-untyped-call]
    return any(n["NodeID"] == node_id and n.get("Alive") for n in nodes)
