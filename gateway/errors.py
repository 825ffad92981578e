"""HTTP-only errors, and the one place any error becomes ``{"error": {"code", "message"}}``.

    Unauthorized (401)         no API key, or an unknown one
    ├── TokenInvalid           a run token malformed or tampered with
    ├── TokenExpired           a run token past its expiry
    ├── TokenWrongRun          a valid run token, for another run
    └── TokenNotAllowed        a run token where only an API key is accepted
    PayloadTooLarge (413)      a body over GENX_MAX_BODY_BYTES
    StreamLimit (429)          a tenant's event streams at GENX_MAX_STREAMS_PER_TENANT

and Redis unreachable anywhere in a request: 503 ``redis_unavailable`` with ``Retry-After``
(:mod:`gateway.outage`).

No message here ever repeats a credential: errors are returned to anyone and may be logged.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from gateway.outage import REDIS_DOWN, RETRY_AFTER_SECONDS
from genx_ray.model import GenxError, QuotaExceeded, UserError

log = logging.getLogger("gateway")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


class Unauthorized(GenxError):
    status_code = 401
    code = "unauthorized"


class TokenInvalid(Unauthorized):
    """A run token that is malformed, or whose signature does not match (tampered, or signed
    with another secret)."""

    code = "token_invalid"


class TokenExpired(Unauthorized):
    code = "token_expired"


class TokenWrongRun(Unauthorized):
    """A valid run token, presented for another run than its own."""

    code = "token_wrong_run"


class TokenNotAllowed(Unauthorized):
    """A run token where only an API key is accepted (list, start, cancel, mint...)."""

    code = "token_not_allowed"


class PayloadTooLarge(UserError):
    status_code = 413
    code = "payload_too_large"


class StreamLimit(QuotaExceeded):
    """A tenant has GENX_MAX_STREAMS_PER_TENANT event streams open on this gateway already
    (a run token's count against its run's tenant): 429 with Retry-After."""

    code = "stream_limit"


def error_response(status: int, code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(GenxError)
    async def genx_error(_: Request, exc: GenxError) -> JSONResponse:
        response = error_response(exc.status_code, exc.code, exc.message)
        if isinstance(exc, QuotaExceeded):
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return response

    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        request.app.state.outage.failed(exc)  # one log line per outage, not per request
        response = error_response(503, "redis_unavailable", "Redis is unavailable: retry shortly")
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    for kind in REDIS_DOWN:
        app.add_exception_handler(kind, redis_down)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "malformed request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(400, "invalid_request", f"{where}: {first.get('msg')}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = error_response(exc.status_code, code, str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # every method of the path (Starlette names one route's)
            response.headers["Allow"] = ", ".join(_allowed(request))
        return response

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal", "internal error")


def _allowed(request: Request) -> list[str]:
    """The methods a path takes: those some route fully matches it with (asked of each route,
    so routers included in others are asked too)."""
    return [
        method
        for method in METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.router.routes
        )
    ]
