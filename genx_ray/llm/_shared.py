"""What every client on one event loop shares: the connection pools, the Redis client and the
limiter (one pump per budget per process, however many clients make calls). A client costs next
to nothing to build, so code that makes one per call (common) stays fast."""

from __future__ import annotations

import asyncio
import itertools
import weakref
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx  # the HTTP client openai >= 3 is built on
from openai._constants import DEFAULT_CONNECTION_LIMITS

from genx_ray.llm._limits import Limiter, tenant_budgets
from genx_ray.model import Settings
from genx_ray.store import async_redis, resolve_redis_url


@dataclass
class Shared:
    inner: httpx.AsyncBaseTransport
    redis: Any
    limiter: Limiter


class Pools(httpx.AsyncBaseTransport):
    """Several connection pools, requests dealt out in turn. httpcore checks every connection of
    a pool (a syscall or two each) whenever it assigns a request or takes one back: with 64 calls
    in flight that scan was the largest single cost of a call. Eight pools of a few connections
    each scan an eighth as much."""

    SHARDS = 8

    def __init__(self) -> None:
        verify = httpx.create_ssl_context()  # one SSL context (~20 ms to build) for all of them
        # The SDK's own pool limits: httpx's defaults keep only 20 idle connections, which at
        # a cap of 64 closes and reopens connections all the time.
        self.pools = [
            httpx.AsyncHTTPTransport(verify=verify, limits=DEFAULT_CONNECTION_LIMITS)
            for _ in range(self.SHARDS)
        ]
        self._next = itertools.cycle(self.pools)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await next(self._next).handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.aclose()


_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], Shared]] = (
    weakref.WeakKeyDictionary()
)


def shared_state(settings: Settings) -> Shared:
    """This loop's shared state for these settings (made on first use)."""
    per_loop = _shared.setdefault(asyncio.get_running_loop(), {})
    limits = {**settings.llm_limits, **tenant_budgets(settings.tenant_limits)}
    key = (settings.redis_url, tuple(sorted(limits.items())), settings.llm_lease_seconds)
    state = per_loop.get(key)
    if state is None:
        client = async_redis(resolve_redis_url(settings))  # pings: once per loop, not per call
        limiter = Limiter(client, limits, settings.llm_lease_seconds)
        state = per_loop[key] = Shared(Pools(), client, limiter)
    return state
