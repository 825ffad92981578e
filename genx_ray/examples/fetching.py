"""Fetching a page a user named, safely: the onboarding example's only way out to the web.

A URL from a request must not reach what only the server can: loopback, private networks,
link-local addresses (the cloud metadata endpoints among them) and the like (SSRF). So every hop
is checked, the first and each redirect alike: the name is resolved, every address it resolves
to must be public, and the request then connects to the address that was checked (the name goes
along as ``Host`` and TLS server name), so a name that resolves again to something else (DNS
rebinding) cannot slip past. The sample site's origin (the simulator ``genx dev`` serves, named
by the operator's ``OPENAI_BASE_URL``) is trusted; ``GENX_ALLOW_PRIVATE_URLS=1`` trusts every
address, for onboarding an intranet.

What must stay true (docs/security.md):

- Refused: every address that is not global (loopback, private, link-local, shared, reserved,
  multicast), and the IPv6 forms that lead back to IPv4 or to old local ranges: IPv4-mapped
  and IPv4-compatible (``::a.b.c.d``), NAT64 (``64:ff9b::/96``, ``64:ff9b:1::/48``), 6to4
  (``2002::/16``) and site-local (``fec0::/10``); and every port but 80 and 443.
- A refusal says that a name is not public, never which address it resolves to (an attacker
  would map the private network through the error messages).
- The body is read as a stream and cut at ``max_bytes`` after decompression, the decompressor
  itself bounded: a small gzip of zeros never expands in memory (a run host carries other
  tenants' runs).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import zlib
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from genx_ray.model import UserError

MAX_REDIRECTS = 5
ALLOW_PRIVATE = "GENX_ALLOW_PRIVATE_URLS"
MAX_BODY_BYTES = 1024 * 1024  # what get() reads of a body (decompressed), at most
PORTS = frozenset({80, 443})  # the only ports fetched (unless GENX_ALLOW_PRIVATE_URLS=1)
# IPv6 ranges that reach IPv4 (or old local ranges) in ways the address's own flags do not tell.
_BLOCKED_V6 = tuple(
    ipaddress.ip_network(n)
    for n in ("64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "fec0::/10", "::/96")
)
_ENCODINGS = ("gzip", "deflate")  # asked for, and the only ones decoded


class UnsafeURL(UserError):
    """A URL that names (or redirects to) an address the server must not fetch from a request."""


def _private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # a scoped IPv6 address: its zone off
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif any(ip in net for net in _BLOCKED_V6):
            return True
    return not ip.is_global or ip.is_multicast


async def resolve_public(url: str, trusted: frozenset[str] = frozenset()) -> str | None:
    """The address to connect to for ``url`` once every address its host resolves to is public;
    None for a trusted origin (connect as usual). Raises :class:`UnsafeURL` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeURL(f"only http and https URLs can be fetched, not {url!r}")
    if f"{parts.scheme}://{parts.netloc}" in trusted or os.environ.get(ALLOW_PRIVATE) == "1":
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeURL(f"{url!r} has no valid port") from None
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, port, type=socket.SOCK_STREAM
        )
    except socket.gaierror as exc:
        raise UnsafeURL(f"cannot resolve {parts.hostname!r}: {exc.strerror}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses or any(_private(a) for a in addresses):
        # Which address, never: the error goes back to whoever asked.
        raise UnsafeURL(
            f"{parts.hostname!r} is not a public address, so it is not fetched (set "
            f"{ALLOW_PRIVATE}=1 to allow private addresses)"
        )
    if port not in PORTS:
        raise UnsafeURL(
            f"port {port}: only ports 80 and 443 are fetched (set {ALLOW_PRIVATE}=1 to allow "
            "others)"
        )
    return addresses[0]


async def get(
    http: httpx.AsyncClient,
    url: str,
    trusted: frozenset[str] = frozenset(),
    *,
    max_bytes: int = MAX_BODY_BYTES,
) -> httpx.Response:
    """GET ``url``, following at most MAX_REDIRECTS redirects, each hop checked. ``http`` must
    not follow redirects itself. Returns the last response, its body read (decompressed) up to
    ``max_bytes`` and cut there (the URL it answered for is ``response.url``'s path on the name
    asked for, see :func:`final_url`)."""
    for _ in range(MAX_REDIRECTS + 1):
        address = await resolve_public(url, trusted)
        parts = urlsplit(url)
        headers = {"Accept-Encoding": ", ".join(_ENCODINGS)}
        if address is None:
            request = http.build_request("GET", url, headers=headers)
        else:
            host = f"[{address}]" if ":" in address else address
            netloc = f"{host}:{parts.port}" if parts.port else host
            target = urlunsplit(parts._replace(netloc=netloc))
            request = http.build_request(
                "GET", target, headers={**headers, "Host": parts.netloc.rpartition("@")[2]},
                extensions={"sni_hostname": parts.hostname},
            )  # fmt: skip
        response = await http.send(request, stream=True)
        if not response.is_redirect:
            try:
                body = await read_limited(response, max_bytes)
            finally:
                await response.aclose()
            kept = [(k, v) for k, v in response.headers.multi_items()
                    if k.lower() not in ("content-encoding", "content-length",
                                         "transfer-encoding")]  # fmt: skip
            return httpx.Response(
                response.status_code, headers=kept, content=body, request=response.request,
                extensions={**response.extensions, "genx_url": url},
            )  # fmt: skip
        await response.aclose()
        url = urljoin(url, response.headers["location"])
    raise UnsafeURL(f"more than {MAX_REDIRECTS} redirects from {url!r}")


async def read_limited(response: httpx.Response, max_bytes: int) -> bytes:
    """At most ``max_bytes`` of a streamed response's body, decompressed (gzip or deflate) with
    the decompressor's output bounded at each step: memory stays about ``max_bytes`` however
    far the body would expand. Reading stops at the limit."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        inflate = None
    elif encoding in ("gzip", "x-gzip"):
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflate = zlib.decompressobj()
    else:
        raise UserError(f"the server sent a body encoded as {encoding!r}, which was not asked for")
    out = bytearray()
    async for raw in response.aiter_raw():
        if inflate is None:
            out += raw[: max_bytes + 1 - len(out)]
        else:
            try:
                pending = raw
                while pending and len(out) <= max_bytes:
                    out += inflate.decompress(pending, max_bytes + 1 - len(out))
                    pending = inflate.unconsumed_tail
                    if inflate.eof:  # a gzip of several members: the next one
                        pending, inflate = (
                            inflate.unused_data,
                            zlib.decompressobj(
                                16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS
                            ),
                        )
            except zlib.error as exc:
                raise UserError(f"the body does not decompress as {encoding}: {exc}") from None
        if len(out) > max_bytes:
            break
    return bytes(out[:max_bytes])


def final_url(response: httpx.Response) -> str:
    """The URL (with its host name, not the address connected to) that gave ``response``."""
    return str(response.extensions.get("genx_url", response.url))
