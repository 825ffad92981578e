"""The browser run viewer, the operators' console and the JS module for web apps, served from
``gateway/static/``.

``GET /ui/`` is the console (console.html: runs, a run, schedules, the cluster), signed in with
an API key that its script keeps in ``sessionStorage`` and sends as a bearer header only (never
in a URL or a cookie); a gateway without API keys opens it to anyone, as it opens its API. It
shows a run with the viewer's own module (run-view.js).

``GET /ui/runs/{id}?token=...`` is one static page (no build step, nothing from the internet):
its script reads the run id and token from its own URL, fetches the run, and follows the run's
events with ``EventSource``, resuming after the last event id it saw; a reload rebuilds the page
from the whole stream. What must stay true:

- Run data is never HTML: the page's scripts only ever set ``textContent``, and the page's
  Content-Security-Policy allows no inline script, no script or style from elsewhere, and
  connections to this gateway only, so even a slip there runs nothing.
- The page holds no data: the same bytes for every run. Its status code says whether the
  credential it was opened with reads the run (200, 401, 404); the page then shows the API's own
  error code. The token in its URL is sent to no one else (``Referrer-Policy: no-referrer``).
- ``/ui/genx.js`` is the module any web app imports to start and follow runs; the viewer uses it.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from gateway.auth import TOKEN_HELP, read_access
from genx_ray.model import GenxError
from genx_ray.store import RunStore

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {  # every file /ui/{name} serves: nothing else under static/ is reachable
    "genx.js": "text/javascript; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "run-view.js": "text/javascript; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'"
)

router = APIRouter(include_in_schema=False)


@functools.cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@functools.cache
def _etag(name: str) -> str:
    return '"' + hashlib.sha256(_read(name)).hexdigest()[:20] + '"'


def _page_headers(request: Request) -> dict[str, str]:
    # The viewer may be framed by the browser apps allowed to call the API, and by no one else:
    # a "*" (any origin may call the API) never lets any site frame it (clickjacking).
    origins = [o for o in request.app.state.settings.cors_origins if o != "*"]
    ancestors = " ".join(origins) if origins else "'none'"
    return {
        "Content-Security-Policy": f"{_PAGE_CSP}; frame-ancestors {ancestors}",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


@router.get("/ui/runs/{run_id}")
async def viewer(
    run_id: str,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    token: Annotated[str | None, Query(description=TOKEN_HELP)] = None,
) -> Response:
    """The viewer page of one run."""
    status = 200
    try:
        who = await read_access(request, run_id, authorization, token)
        runs: RunStore = request.app.state.runs
        await runs.get(run_id, tenant=who)
    except GenxError as exc:  # the page still loads: it shows the API's error itself
        status = exc.status_code
    return Response(
        _read("viewer.html"),
        status_code=status,
        media_type="text/html; charset=utf-8",
        headers=_page_headers(request),
    )


@router.get("/ui/")
async def console(request: Request) -> Response:
    """The operators' console: the same bytes for everyone (its script asks the API for data,
    with the key the operator signs in with)."""
    return Response(
        _read("console.html"),
        media_type="text/html; charset=utf-8",
        headers=_page_headers(request),
    )


@router.get("/ui")
async def console_slash() -> Response:
    return Response(status_code=308, headers={"Location": "ui/"})  # relative: under a prefix too


@router.get("/ui/{name}")
async def asset(
    name: str, if_none_match: Annotated[str | None, Header(max_length=200)] = None
) -> Response:
    """The viewer's script and style, and ``genx.js`` for web apps."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, f"no file {name!r} under /ui")
    # Revalidated on every use (a new gateway version's files are seen at once), cheaply.
    headers = {
        "Cache-Control": "no-cache",
        "ETag": _etag(name),
        "X-Content-Type-Options": "nosniff",
    }
    if if_none_match == _etag(name):
        return Response(status_code=304, headers=headers)
    return Response(_read(name), media_type=media_type, headers=headers)
