"""The gateway while Redis is down: every route answers ``503 redis_unavailable`` with
``Retry-After`` (never a 500 and a traceback per request), open event streams end cleanly with a
``retry:`` hint (clients reconnect and resume by id), and the log says once that Redis is gone and
once that it is back: a probe pings it meanwhile, so the second line comes even with no traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from genx_ray.observe import REDIS_DOWN, OutageLog

RETRY_AFTER_SECONDS = 2
PROBE_SECONDS = 0.5

log = logging.getLogger("gateway")

__all__ = ["REDIS_DOWN", "RETRY_AFTER_SECONDS", "RedisOutage"]


class RedisOutage(OutageLog):
    def __init__(self, redis: Any) -> None:
        super().__init__("gateway", log)
        self.redis = redis
        self._probe: asyncio.Task[None] | None = None

    def failed(self, exc: BaseException) -> None:
        super().failed(exc)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._until_back())

    async def _until_back(self) -> None:
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            with contextlib.suppress(*REDIS_DOWN, OSError):
                await self.redis.ping()
                self.ok()
                return

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
