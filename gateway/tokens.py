"""Run tokens: browser-safe credentials for one run.

A token is ``gxt_`` + base64url(payload) + ``.`` + base64url(HMAC-SHA256(secret, payload)), the
payload being the JSON ``{"r": run id, "t": tenant, "e": expiry in unix seconds}`` (base64url
without padding), plus ``"s": "answer"`` for a token that may also answer the run's
``wait_for_input`` (``POST /v1/runs/{id}/input``: a link for a reviewer); without it, a token
only reads. It is opaque to its holder and checked without any lookup: a gateway that has
the secret verifies the signature (in constant time), then the expiry; the routes check the run.
What must stay true:

- Only a signature made with the secret verifies; any change to the payload or the signature is
  :class:`~gateway.errors.TokenInvalid`, told apart from :class:`~gateway.errors.TokenExpired`
  only once the signature is good (a forger learns nothing from the error).
- Every gateway sharing the secret accepts every token any of them minted. The secret is
  ``GENX_TOKEN_SECRET``, or else a random one kept in Redis (:data:`genx_ray.store._keys.TOKEN_SECRET`,
  created once with SET NX, never expired): replicas and restarted gateways share it. (A Redis
  that loses its data loses that secret too, and with it every token minted so far; set
  ``GENX_TOKEN_SECRET`` where tokens must outlive that.)
- A token never reaches a log: :mod:`genx_ray.model._redaction` masks them in the server's log records, and
  no error message repeats one.

Everything here but :func:`shared_secret` is a pure function of its arguments.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from gateway.errors import TokenExpired, TokenInvalid
from genx_ray.store import keys

PREFIX = "gxt_"
_SHAPE = re.compile(re.escape(PREFIX) + r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# Far longer than any real token (run ids and tenant names are short): a bigger string is
# rejected before it is decoded.
MAX_CHARS = 2048
log = logging.getLogger("gateway.tokens")


READ, ANSWER = "read", "answer"
SCOPES = (READ, ANSWER)


@dataclass(frozen=True, slots=True)
class Claims:
    """What a valid token grants: reading ``run_id`` (of ``tenant``) until ``expires_at``, and
    answering its input requests if ``scope`` is ``answer``."""

    run_id: str
    tenant: str
    expires_at: int  # unix seconds
    scope: str = READ


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, payload, hashlib.sha256).digest()


def mint(secret: bytes, run_id: str, tenant: str, expires_at: int, scope: str = READ) -> str:
    """A token granting ``scope`` on ``run_id`` until ``expires_at`` (unix seconds)."""
    fields: dict[str, Any] = {"r": run_id, "t": tenant, "e": int(expires_at)}
    if scope != READ:
        fields["s"] = scope
    payload = json.dumps(fields, separators=(",", ":")).encode()
    return f"{PREFIX}{_b64(payload)}.{_b64(_signature(secret, payload))}"


def verify(secret: bytes, token: str, now: float) -> Claims:
    """The claims of a token signed with ``secret``; :class:`TokenInvalid` if it is malformed
    or its signature does not match, :class:`TokenExpired` if it is past its expiry at ``now``."""
    if len(token) > MAX_CHARS or not _SHAPE.fullmatch(token):
        raise TokenInvalid("malformed run token")
    body, _, sig = token[len(PREFIX) :].partition(".")
    try:
        payload, signature = _unb64(body), _unb64(sig)
    except (binascii.Error, ValueError):
        raise TokenInvalid("malformed run token") from None
    # Only the canonical spelling is accepted: one string per token, none made by re-padding.
    if _b64(payload) != body or not hmac.compare_digest(signature, _signature(secret, payload)):
        raise TokenInvalid("the run token's signature does not match")
    try:
        fields: Any = json.loads(payload)
        claims = Claims(
            str(fields["r"]), str(fields["t"]), int(fields["e"]), str(fields.get("s", READ))
        )
        if claims.scope not in SCOPES:
            raise ValueError(claims.scope)
    except (ValueError, KeyError, TypeError):  # signed, so ours: a format this version lacks
        raise TokenInvalid("malformed run token") from None
    if claims.expires_at <= now:
        raise TokenExpired("the run token has expired; mint another with POST /v1/runs/{id}/tokens")
    return claims


def is_token(credential: str) -> bool:
    """Whether a credential is meant as a run token (rather than an API key)."""
    return credential.startswith(PREFIX)


@dataclass(frozen=True, slots=True)
class TokenSigner:
    """The gateway's minting and checking of tokens: its secret and the default lifetime."""

    secret: bytes
    ttl: int  # seconds; GENX_TOKEN_TTL

    def mint(
        self, run_id: str, tenant: str, ttl: int | None = None, scope: str = READ
    ) -> tuple[str, int]:
        """A token for ``run_id`` living ``ttl`` seconds (the default TTL if None), and when it
        expires (unix seconds)."""
        expires_at = int(time.time()) + (ttl or self.ttl)
        return mint(self.secret, run_id, tenant, expires_at, scope), expires_at

    def verify(self, token: str) -> Claims:
        return verify(self.secret, token, time.time())


async def shared_secret(client: Any, configured: str | None) -> bytes:
    """The signing secret: ``GENX_TOKEN_SECRET`` if set, else the one every gateway on this
    Redis shares (created here by the first gateway to start)."""
    if configured:
        if len(configured) < 32:
            log.warning(
                "GENX_TOKEN_SECRET is short (%d characters); use 32 or more", len(configured)
            )
        return configured.encode()
    while True:  # again only if the key was deleted between the two commands
        await client.set(keys.TOKEN_SECRET, secrets.token_hex(32), nx=True)
        value = await client.get(keys.TOKEN_SECRET)
        if value is not None:
            return value.encode() if isinstance(value, str) else bytes(value)
