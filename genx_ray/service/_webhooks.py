"""Webhooks: a signed POST when a run ends, retried until delivered.

Whoever ends a run (its host, the supervisor, a cancel) appends the run id to an outbox stream;
workers deliver from it through a consumer group. A delivery that keeps failing is retried with
backoff, then dropped with a log line; a worker that dies mid-delivery leaves the entry pending
for another to claim. The body is the run as the API shows it; ``X-Genx-Signature`` is
``sha256=<hex HMAC of "<timestamp>.<body>">`` with ``GENX_WEBHOOK_SECRET``, and
``X-Genx-Timestamp`` is the timestamp, so receivers can reject replays.

What must stay true: one entry's trouble is that entry's alone. An entry that cannot be
delivered for a reason of its own (malformed, a record that does not serialize) is dropped with
a log line naming why, and the sender goes on; an unexpected error of the loop itself is logged
once and the loop goes on (it never dies silently, leaving every later run's notice undelivered).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio
from redis.exceptions import ResponseError

from genx_ray.model import RunNotFound, Settings
from genx_ray.store import RunStore, keys

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("genx_ray.webhooks")
ATTEMPTS = 6
CLAIM_IDLE_MS = 60_000


def _run_of(entry_id: Any, fields: Any) -> str | None:
    run_id = fields.get("run") if isinstance(fields, dict) else None
    if not isinstance(run_id, str) or not run_id:
        log.error("webhooks: outbox entry %s names no run; dropped", entry_id)
        return None
    return run_id


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class WebhookSender:
    def __init__(self, client: redis.asyncio.Redis, settings: Settings, name: str) -> None:
        self.redis, self.settings, self.name = client, settings, name
        self.runs = RunStore(client)
        self.initial_delay = 0.5

    async def serve(self, stop: asyncio.Event) -> None:
        if not self.settings.webhook_url:
            return
        try:
            await self.redis.xgroup_create(keys.WEBHOOKS, keys.WEBHOOK_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        failing = False  # one log line per trouble of the loop, not one per second
        import httpx  # here: `import genx_ray` need not load an HTTP client (and its CLI)

        async with httpx.AsyncClient(timeout=10) as http:
            while not stop.is_set():
                try:
                    for entry_id, run_id in await self._take():
                        if run_id is not None:
                            await self._contained(http, entry_id, run_id)
                        await self.redis.xack(keys.WEBHOOKS, keys.WEBHOOK_GROUP, entry_id)
                        await self.redis.xdel(keys.WEBHOOKS, entry_id)
                    failing = False
                except (OSError, redis.RedisError) as exc:
                    log.warning("webhooks: %s; retrying", exc)
                    await asyncio.sleep(1)
                except Exception as exc:  # a bug or bad data: logged, and the sender goes on
                    if not failing:
                        log.error("webhooks: %s: %s; going on", type(exc).__name__, exc)
                    failing = True
                    await asyncio.sleep(1)

    async def _contained(self, http: httpx.AsyncClient, entry_id: str, run_id: str) -> None:
        """Deliver one entry; an error of its own drops it (with the reason), not the sender."""
        try:
            await self._deliver(http, run_id)
        except (OSError, redis.RedisError):
            raise  # Redis away: the entry stays pending, delivered when it is back
        except Exception as exc:
            log.error("webhook for %s (entry %s) dropped: %s: %s", run_id, entry_id,
                      type(exc).__name__, exc)  # fmt: skip

    async def _take(self) -> list[tuple[str, str | None]]:
        """Entries to deliver: (entry id, run id), the run id None for a malformed entry (then
        only acknowledged and dropped)."""
        claimed: list[Any] = await self.redis.xautoclaim(
            keys.WEBHOOKS, keys.WEBHOOK_GROUP, self.name, CLAIM_IDLE_MS, "0-0", count=10
        )
        if claimed[1]:
            return [(str(i), _run_of(i, f)) for i, f in claimed[1] if f]
        resp = cast(
            list[Any],
            await self.redis.xreadgroup(
                keys.WEBHOOK_GROUP, self.name, {keys.WEBHOOKS: ">"}, count=10, block=500
            ),
        )
        return [(str(i), _run_of(i, f)) for i, f in resp[0][1]] if resp else []

    async def _deliver(self, http: httpx.AsyncClient, run_id: str) -> bool:
        import httpx

        try:
            run = await self.runs.get(run_id)
        except RunNotFound:
            return False
        body = json.dumps(run.model_dump(mode="json", exclude={"tenant"})).encode()
        delay = self.initial_delay
        for attempt in range(1, ATTEMPTS + 1):
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "X-Genx-Event": f"run.{run.status.value}",
                "X-Genx-Timestamp": timestamp,
                "X-Genx-Signature": sign(self.settings.webhook_secret, timestamp, body),
            }
            try:
                resp = await http.post(
                    str(self.settings.webhook_url), content=body, headers=headers
                )
                if resp.status_code < 300:
                    return True
                reason = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                reason = str(exc) or type(exc).__name__
            log.warning("webhook for %s: attempt %d failed (%s)", run_id, attempt, reason)
            if attempt < ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 2
        log.error("webhook for %s: giving up after %d attempts", run_id, ATTEMPTS)
        return False
