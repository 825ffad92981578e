"""Running workflows from a script or a notebook: ``run`` and ``start``.

Runs started here execute on a background event loop in this process (a notebook's own loop is
never blocked), write everything to Redis like any other run, hold a lease like any other, and
use the local Ray only when a step asks for it. If this process dies, a supervisor (a worker's,
or the next script's) fails its runs with the reason: they are not restarted elsewhere, since
workers may not have their code. The handle reads the run back from Redis, so it works the same
for a run any worker executes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import secrets
import threading
import time
from collections.abc import Coroutine, Iterator
from datetime import datetime
from typing import Any, TypeVar, cast

from pydantic import BaseModel
from redis.exceptions import RedisClusterException, RedisError

from genx_ray.engine import Executor
from genx_ray.flow import Registry, Workflow, registry
from genx_ray.model import (
    DEFAULT_PRIORITY,
    Run,
    RunCancelled,
    RunFailed,
    RunStatus,
    Settings,
    check_priority,
)
from genx_ray.service._supervisor import Supervisor
from genx_ray.store import (
    MAX_BLOCK_MS,
    START,
    RunStore,
    StreamEntry,
    SyncRedis,
    async_redis,
    check_event_id,
    follow_sync,
    keys,
    resolve_redis_url,
    start_time,
    sync_redis,
)

T = TypeVar("T")
# A Redis out of reach, single or cluster (the cluster's own error is no RedisError).
_UNREACHABLE = (RedisError, RedisClusterException, OSError)
RUNNER_TTL = 15.0  # a script's process silent this long is gone (its resumed runs fail)


class RunHandle:
    """A run, seen from the caller: ``id``, ``events()``, ``result()``, ``cancel()``."""

    def __init__(
        self,
        run_id: str,
        redis_url: str,
        workflow: Workflow[Any, Any] | None = None,
        future: concurrent.futures.Future[Any] | None = None,
    ) -> None:
        self.id = run_id
        self._redis: SyncRedis = sync_redis(redis_url)
        self._workflow = workflow
        self._future = future

    def __repr__(self) -> str:
        return f"<RunHandle {self.id}>"

    def get(self) -> Run:
        return Run.from_hash(cast(dict[str, str], self._redis.hgetall(keys.run(self.id))))

    @property
    def status(self) -> RunStatus:
        return self.get().status

    def events(
        self, after: str | None = None, *, follow: bool = True, block_ms: int = MAX_BLOCK_MS
    ) -> Iterator[StreamEntry]:
        """Every event after ``after`` (from the start by default), oldest first; with ``follow``
        it then waits for live events until the terminal one. Resume by passing the last id."""
        start = check_event_id(after) if after else START
        return follow_sync(self._redis, self.id, start, follow=follow, block_ms=block_ms)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to end; its output (decoded to the workflow's return type), or
        :class:`RunFailed` / :class:`RunCancelled`, or ``TimeoutError``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.get()
            if run.status.terminal:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {self.id} still {run.status} after {timeout}s")
            wait_ms = (
                500
                if deadline is None
                else max(1, int(min(0.5, deadline - time.monotonic()) * 1000))
            )
            self._redis.xread({keys.events(self.id): "$"}, block=wait_ms)
        if run.status is RunStatus.SUCCEEDED:
            return self._workflow.output.decode(run.output) if self._workflow else run.output
        if run.status is RunStatus.CANCELLED:
            raise RunCancelled(self.id)
        error = run.error
        raise RunFailed(self.id, error.type if error else "Error", error.message if error else "")

    def cancel(self) -> RunStatus:
        """Ask the run to stop; it does within a second (at once if it is still queued)."""
        return _runner().call(RunStore(_runner().redis).request_cancel(self.id))

    def send_input(self, value: Any, *, input_id: str | None = None) -> Run:
        """Answer the run's ``wait_for_input``: ``value`` (a model or JSON-able data) is checked
        against the schema it asked for (:class:`InputInvalid` naming the field), and the run
        carries on. :class:`NotWaitingForInput` when it does not wait for input (or, with
        ``input_id``, waits for another)."""
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        store = RunStore(_runner().redis)
        return _runner().call(store.deliver_input(self.id, value, input_id=input_id))


class _LocalRunner:
    """A daemon thread with an event loop, a Redis client and a runtime (with a supervisor),
    executing runs for this process.

    Its runs come back to it when they resume after a wait (a sleep, input, a child): they are
    queued on its own stream (``keys.local_queue``), not the workers' queue (workers may not have
    their code). A key with a short TTL, renewed by a thread, says it is alive; a run whose
    process is gone when it resumes fails with the reason.
    """

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.id = secrets.token_hex(8)
        self.queue = keys.local_queue(self.id)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="genx-runner", daemon=True
        )
        self._thread.start()
        self.settings = Settings.current()
        self._closed = threading.Event()
        threading.Thread(target=self._alive, name="genx-runner-alive", daemon=True).start()
        self.redis, self.executor = self.call(self._start())

    @property
    def fields(self) -> dict[str, str]:
        """What a run of this process carries in its record."""
        return {"origin": "local", "queue": self.queue, "runner": self.id}

    def _alive(self) -> None:
        client = sync_redis(self.redis_url)
        while not self._closed.is_set():
            with contextlib.suppress(*_UNREACHABLE):
                client.set(keys.runner(self.id), "1", px=int(RUNNER_TTL * 1000))
            self._closed.wait(RUNNER_TTL / 3)
        with contextlib.suppress(*_UNREACHABLE):  # closed: its Redis may be gone already
            client.delete(keys.runner(self.id))
        client.close()

    async def _start(self) -> tuple[Any, Executor]:
        client = async_redis(self.redis_url)
        runtime = Executor(client, Registry(), self.settings, redis_url=self.redis_url)
        self.supervisor = Supervisor(client, self.settings)
        self._stop = asyncio.Event()
        self._tasks = [
            self.loop.create_task(self.supervisor.serve(self._stop)),
            self.loop.create_task(self._take(client, runtime)),
        ]
        return client, runtime

    def close(self) -> None:
        """Stop this runner: its supervisor, its queue and its sign of life (its open runs then
        fail when they resume, as when the process is gone)."""
        self._closed.set()

        async def stop() -> None:
            self._stop.set()
            await asyncio.wait_for(self._tasks[0], 10)  # the supervisor ends its pass
            self._tasks[1].cancel()
            await asyncio.gather(self._tasks[1], return_exceptions=True)
            await self.redis.aclose()

        with contextlib.suppress(Exception):  # closing is best effort: the thread is a daemon
            self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _take(self, client: Any, runtime: Executor) -> None:
        """Start this process's runs as they come back on its queue."""
        last = "0-0"
        while True:
            try:
                resp = await client.xread({self.queue: last}, count=100, block=1000)
            except _UNREACHABLE:
                await asyncio.sleep(1)
                continue
            for _, entries in resp or ():
                for entry_id, f in entries:
                    last = entry_id
                    attempt = int(f["attempt"]) if f.get("attempt") else None
                    await runtime.start(f["run"], "local", attempt=attempt)
                    await client.xdel(self.queue, entry_id)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()


_lock = threading.Lock()
# Runners by the GENX_REDIS_URL they were made for (and the URL it resolved to): a process that
# points GENX_REDIS_URL elsewhere later (a notebook, a test) starts its next runs there.
_runners: dict[str, _LocalRunner] = {}


def _runner() -> _LocalRunner:
    with _lock:
        configured = Settings.current().redis_url
        runner = _runners.get(configured)
        if runner is None:
            # A script or notebook may make do with a private Redis (started, and said so,
            # only when GENX_REDIS_URL is unset and nothing answers at the default URL).
            url = resolve_redis_url(allow_embedded=True)
            runner = _runners.get(url) or _LocalRunner(url)
            _runners[configured] = _runners[url] = runner
        return runner


def close_runners(redis_url: str | None = None) -> None:
    """Stop this process's local runners (those of ``redis_url``, or all): their supervisors
    stop ticking and their runs stop being taken. For a test or notebook that points
    ``GENX_REDIS_URL`` elsewhere and empties the Redis it used; the next :func:`start` makes a
    new runner."""
    with _lock:
        doomed = {id(r): r for url, r in _runners.items() if redis_url in (None, url, r.redis_url)}
        for url in [u for u, r in _runners.items() if id(r) in doomed]:
            del _runners[url]
    for runner in doomed.values():
        runner.close()


def _resolve(wf: Workflow[Any, Any] | str) -> Workflow[Any, Any]:
    return registry.get(wf) if isinstance(wf, str) else wf


def start(
    wf: Workflow[Any, Any] | str,
    input: Any = None,
    *,
    tenant: str = "default",
    start_at: datetime | None = None,
    delay_seconds: float | None = None,
    priority: int = DEFAULT_PRIORITY,
) -> RunHandle:
    """Start a run of ``wf`` in the background; returns its handle at once.

    Redis comes from ``GENX_REDIS_URL`` (an embedded one is started when none is set and none
    answers); Ray is started only if a step needs it. The input is validated first:
    :class:`InputInvalid` says what is wrong and nothing is created. With ``start_at`` (an aware
    datetime) or ``delay_seconds`` the run is ``scheduled`` until then, and this process starts
    it when its time comes (if it is still alive). ``priority`` (1 most urgent .. 5) is the
    run's, and its children's (a script's runs start in its own process, in no queue).
    """
    priority = check_priority(priority)
    when = start_time(start_at, delay_seconds)
    workflow = _resolve(wf)
    payload = workflow.encode_input(input)
    runner = _runner()
    runner.executor.registry.add(workflow)
    settings = runner.settings

    async def create() -> str:
        store = RunStore(
            runner.redis,
            maxlen=settings.stream_maxlen,
            retention_seconds=settings.retention_seconds,
        )
        run = await store.create(
            workflow.name, payload, tenant=tenant, extra=runner.fields, start_at=when,
            priority=priority,
        )  # fmt: skip
        return run.id

    run_id = runner.call(create())
    future = None
    if when is None:
        future = runner.submit(
            runner.executor.execute(run_id, "local", attempt=1, workflow=workflow.name)
        )
    return RunHandle(run_id, runner.redis_url, workflow, future)


def run(wf: Workflow[Any, Any] | str, input: Any = None, *, timeout: float | None = None) -> Any:
    """Run ``wf`` to completion and return its output (raises :class:`RunFailed` if it fails)."""
    return start(wf, input).result(timeout)
