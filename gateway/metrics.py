"""``GET /metrics``: the gateway's metrics in the Prometheus text format (:mod:`genx_ray.observe`).

Unauthenticated, like ``/healthz``: it tells counts by workflow, component and model, nothing of
any run's content. The queue's gauges are read from Redis at each scrape.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from genx_ray.observe import CONTENT_TYPE, exposition, sse_clients
from genx_ray.store import ConcurrencyKeys, queue_gauges

router = APIRouter()


@router.get("/metrics", tags=["ops"], response_class=Response)
async def scrape(request: Request) -> Response:
    gauges, labelled = await queue_gauges(request.app.state.redis)
    gauges["genx_sse_clients"] = sse_clients()
    gauges["genx_runs_held_by_concurrency_key"] = await ConcurrencyKeys(
        request.app.state.redis
    ).held()
    return Response(exposition(gauges, labelled=labelled), media_type=CONTENT_TYPE)
