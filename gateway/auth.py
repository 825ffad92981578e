"""Who is calling, and what they may read.

Two credentials exist. An API key (``Authorization: Bearer <key>``, from ``GENX_API_KEYS``)
acts for its tenant on every route. A run token (:mod:`gateway.tokens`, as ``?token=`` or as the
bearer credential) reads one run: ``GET /v1/runs/{id}``, its events and its viewer page, and
nothing else. What must stay true:

- A run token is never accepted where only an API key is (:func:`tenant`): presenting one there
  is :class:`TokenNotAllowed`, whether or not API keys are configured.
- A presented token is always checked, API keys or not: a bad one is a 401, never ignored.
- Without API keys everything else stays open, as one tenant.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Header, Query, Request

from gateway.errors import TokenNotAllowed, TokenWrongRun, Unauthorized
from gateway.tokens import ANSWER, TokenSigner, is_token
from genx_ray.model import DEFAULT_TENANT, Settings

TOKEN_HELP = (
    "a run token, read-only and for this run only (the run's stream_token, or one minted with "
    "POST /v1/runs/{id}/tokens); the same as the bearer credential"
)


ANSWER_HELP = (
    "a run token minted with scope answer (POST /v1/runs/{id}/tokens); the same as the bearer "
    "credential"
)


def _bearer(authorization: str | None) -> str | None:
    scheme, _, credential = (authorization or "").partition(" ")
    return credential.strip() or None if scheme.lower() == "bearer" else None


def _key_tenant(settings: Settings, authorization: str | None) -> str:
    if not settings.api_keys:
        return DEFAULT_TENANT
    credential = _bearer(authorization)
    if credential is None:
        raise Unauthorized("an Authorization: Bearer <key> header is required")
    found = None
    for key, name in settings.api_keys.items():  # every key compared: the time says nothing
        if hmac.compare_digest(key.encode(), credential.encode()):
            found = str(name)
    if found is None:
        raise Unauthorized("unknown API key")
    return found


async def tenant(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The caller's tenant, from its API key (one tenant when no keys are configured); for the
    routes a run token does not open."""
    bearer = _bearer(authorization)
    if "token" in request.query_params or (bearer is not None and is_token(bearer)):
        raise TokenNotAllowed(
            "a run token only reads its own run (GET /v1/runs/{id}, its events, its viewer); "
            "this needs an API key"
        )
    return _key_tenant(request.app.state.settings, authorization)


async def read_access(
    request: Request, run_id: str, authorization: str | None, token: str | None
) -> str:
    """The tenant as whom the caller may read run ``run_id``: its API key's, or its run token's
    (each presented token checked: valid, unexpired, for this run)."""
    bearer = _bearer(authorization)
    presented = [token] if token is not None else []
    if bearer is not None and is_token(bearer):
        presented.append(bearer)
        bearer = None
    signer: TokenSigner = request.app.state.tokens
    claims = [signer.verify(t) for t in presented]
    if any(c.run_id != run_id for c in claims):
        raise TokenWrongRun("the run token was issued for another run")
    if claims and bearer is None:
        return claims[0].tenant
    return _key_tenant(request.app.state.settings, authorization)  # an API key, or open


async def run_answerer(
    run_id: str,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    token: Annotated[str | None, Query(description=ANSWER_HELP)] = None,
) -> str:
    """The tenant as whom the caller may answer run ``run_id``'s input: its API key's, or that
    of a run token minted with scope ``answer`` for this run (a read-only token is refused)."""
    bearer = _bearer(authorization)
    presented = token if token is not None else bearer if bearer and is_token(bearer) else None
    if presented is None:
        return _key_tenant(request.app.state.settings, authorization)
    signer: TokenSigner = request.app.state.tokens
    claims = signer.verify(presented)
    if claims.run_id != run_id:
        raise TokenWrongRun("the run token was issued for another run")
    if claims.scope != ANSWER:
        raise TokenNotAllowed(
            "this run token only reads the run; answering needs an API key or a token minted "
            'with POST /v1/runs/{id}/tokens {"scope": "answer"}'
        )
    return claims.tenant


async def run_reader(
    run_id: str,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    token: Annotated[str | None, Query(description=TOKEN_HELP)] = None,
) -> str:
    """:func:`read_access` as a dependency of the routes that read one run."""
    return await read_access(request, run_id, authorization, token)
