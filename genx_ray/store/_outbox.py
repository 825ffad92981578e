"""The webhook outbox: the runs that ended and whose notice is still to be sent.

Whoever ends a run (its host, the supervisor, a cancel through the API) appends its id here, so a
process that dies right after ending a run cannot lose the notice; workers deliver from it (see
:mod:`genx_ray.service._webhooks`).
"""

from __future__ import annotations

import redis.asyncio

from genx_ray.model import Settings
from genx_ray.store import _keys as keys


async def notify(client: redis.asyncio.Redis, settings: Settings, run_id: str) -> None:
    """Queue the webhook for a run that just ended (no-op without ``GENX_WEBHOOK_URL``)."""
    if settings.webhook_url:
        await client.xadd(keys.WEBHOOKS, {"run": run_id})
