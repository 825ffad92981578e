"""Redis outages, told once: one log line when something starts failing to reach Redis, one when
it reaches it again, however many retries lie between (a loop retrying every half second would
otherwise write a line each time, and bury the one that matters).
"""

from __future__ import annotations

import logging
import time

import redis
from redis.exceptions import RedisClusterException

# What "Redis is unavailable" looks like to a client: no connection, no answer in time, a server
# still loading its data, a cluster with slots no node serves.
REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
    RedisClusterException,
    ConnectionError,  # the OS's: refused, reset
)


class OutageLog:
    """Says when ``what`` starts failing (the first failure) and when it works again."""

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self.what = what
        self.log = logger
        self.since: float | None = None  # monotonic time of the first failure, while failing

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning("%s: Redis unavailable (%s); retrying until it is back",
                             self.what, str(exc) or type(exc).__name__)  # fmt: skip

    def ok(self) -> None:
        if self.since is not None:
            self.log.warning("%s: Redis is back after %.1f s", self.what,
                             time.monotonic() - self.since)  # fmt: skip
            self.since = None
