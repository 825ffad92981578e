"""Fetching a page a user named, safely: the onboarding example's only way out to the web.

A URL from a request must not reach what only the server can: loopback, private networks,
link-local addresses (the cloud metadata endpoints among them) and the like (SSRF). So every hop
is checked, the first and each redirect alike: the name is resolved, every address it resolves
to must be public, and the request then connects to the address that was checked (the name goes
along as ``Host`` and TLS server name), so a name that resolves again to something else (DNS
rebinding) cannot slip past. The sample site's origin (the simulator ``genx dev`` serves, named
by the operator's ``OPENAI_BASE_URL``) is trusted; ``GENX_ALLOW_PRIVATE_URLS=1`` trusts every
address, for onboarding an intranet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from genx_ray.model import UserError

MAX_REDIRECTS = 5
ALLOW_PRIVATE = "GENX_ALLOW_PRIVATE_URLS"


class UnsafeURL(UserError):
    """A URL that names (or redirects to) an address the server must not fetch from a request."""


def _private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # a scoped IPv6 address: its zone off
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


async def resolve_public(url: str, trusted: frozenset[str] = frozenset()) -> str | None:
    """The address to connect to for ``url`` once every address its host resolves to is public;
    None for a trusted origin (connect as usual). Raises :class:`UnsafeURL` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeURL(f"only http and https URLs can be fetched, not {url!r}")
    if f"{parts.scheme}://{parts.netloc}" in trusted or os.environ.get(ALLOW_PRIVATE) == "1":
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, port, type=socket.SOCK_STREAM
        )
    except socket.gaierror as exc:
        raise UnsafeURL(f"cannot resolve {parts.hostname!r}: {exc.strerror}") from None
    addresses = [str(info[4][0]) for info in infos]
    blocked = [a for a in addresses if _private(a)]
    if blocked or not addresses:
        raise UnsafeURL(
            f"{parts.hostname!r} resolves to {', '.join(blocked) or 'nothing'}: not a public "
            f"address, so it is not fetched (set {ALLOW_PRIVATE}=1 to allow private addresses)"
        )
    return addresses[0]


async def get(
    http: httpx.AsyncClient, url: str, trusted: frozenset[str] = frozenset()
) -> httpx.Response:
    """GET ``url``, following at most MAX_REDIRECTS redirects, each hop checked. ``http`` must
    not follow redirects itself. Returns the last response (the URL it answered for is
    ``response.url``'s path on the name asked for, see :func:`final_url`)."""
    for _ in range(MAX_REDIRECTS + 1):
        address = await resolve_public(url, trusted)
        parts = urlsplit(url)
        if address is None:
            response = await http.get(url)
        else:
            host = f"[{address}]" if ":" in address else address
            netloc = f"{host}:{parts.port}" if parts.port else host
            target = urlunsplit(parts._replace(netloc=netloc))
            response = await http.get(
                target,
                headers={"Host": parts.netloc.rpartition("@")[2]},
                extensions={"sni_hostname": parts.hostname},
            )
        if not response.is_redirect:
            response.extensions["genx_url"] = url
            return response
        await response.aclose()
        url = urljoin(url, response.headers["location"])
    raise UnsafeURL(f"more than {MAX_REDIRECTS} redirects from {url!r}")


def final_url(response: httpx.Response) -> str:
    """The URL (with its host name, not the address connected to) that gave ``response``."""
    return str(response.extensions.get("genx_url", response.url))
