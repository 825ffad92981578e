"""Webhooks: a signed POST when a run ends, retried until delivered.

Whoever ends a run (its host, the supervisor, a cancel) appends the run id to an outbox stream;
workers deliver from it through a consumer group. A delivery that keeps failing is retried with
backoff, then dropped with a log line; a worker that dies mid-delivery leaves the entry pending
for another to claim. The body is the run as the API shows it; ``X-Genx-Signature`` is
``sha256=<hex HMAC of "<timestamp>.<body>">`` with ``GENX_WEBHOOK_SECRET``, and
``X-Genx-Timestamp`` is the timestamp, so receivers can reject replays.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any, cast

import httpx
import redis.asyncio
from redis.exceptions import ResponseError

from genx_ray.model import RunNotFound, Settings
from genx_ray.store import RunStore, keys

log = logging.getLogger("genx_ray.webhooks")
ATTEMPTS = 6
CLAIM_IDLE_MS = 60_000


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
        async with httpx.AsyncClient(timeout=10) as http:
            while not stop.is_set():
                try:
                    for entry_id, run_id in await self._take():
                        await self._deliver(http, run_id)
                        await self.redis.xack(keys.WEBHOOKS, keys.WEBHOOK_GROUP, entry_id)
                        await self.redis.xdel(keys.WEBHOOKS, entry_id)
                except (OSError, redis.RedisError) as exc:
                    log.warning("webhooks: %s; retrying", exc)
                    await asyncio.sleep(1)

    async def _take(self) -> list[tuple[str, str]]:
        claimed: list[Any] = await self.redis.xautoclaim(
            keys.WEBHOOKS, keys.WEBHOOK_GROUP, self.name, CLAIM_IDLE_MS, "0-0", count=10
        )
        if claimed[1]:
            return [(str(i), f["run"]) for i, f in claimed[1] if f]
        resp = cast(
            list[Any],
            await self.redis.xreadgroup(
                keys.WEBHOOK_GROUP, self.name, {keys.WEBHOOKS: ">"}, count=10, block=500
            ),
        )
        return [(str(i), f["run"]) for i, f in resp[0][1]] if resp else []

    async def _deliver(self, http: httpx.AsyncClient, run_id: str) -> bool:
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
