"""Who is calling: the tenant of a bearer API key (one tenant when no keys are configured)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Header, Request

from gateway.errors import Unauthorized
from genx_ray.runs import DEFAULT_TENANT


async def tenant(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The caller's tenant, from its bearer key (one tenant when no keys are configured)."""
    api_keys = request.app.state.settings.api_keys
    if not api_keys:
        return DEFAULT_TENANT
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("an Authorization: Bearer <key> header is required")
    found = None
    for key, name in api_keys.items():  # every key compared: the time says nothing of which
        if hmac.compare_digest(key.encode(), token.strip().encode()):
            found = str(name)
    if found is None:
        raise Unauthorized("unknown API key")
    return found
