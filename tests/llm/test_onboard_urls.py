"""The onboarding example fetches only public addresses (SSRF): a URL from a request must not
read what only the server can reach. Real HTTP servers on loopback stand in for the internal
pages; the sample site (the simulator's origin) stays crawlable."""

from __future__ import annotations

import gzip
import os
import re
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from genx_ray import UserError, start
from genx_ray.examples import fetching
from genx_ray.examples.onboard import OnboardInput, onboard

from .conftest import Sim

SECRET = "internal-only-4f1c"


class _Pages(BaseHTTPRequestHandler):
    redirect_to = ""

    def do_GET(self) -> None:
        if self.path == "/jump":  # a redirect to wherever the test says
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
            return
        body = f"<html><title>{SECRET}</title><body>{SECRET}</body></html>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def internal() -> Iterator[str]:
    """An 'internal' site on loopback: what an attacker would like the server to read."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/", "http://localhost:8000/", "http://10.1.2.3/", "http://192.168.0.1/",
        "http://172.16.0.1/", "http://169.254.169.254/latest/meta-data/", "http://[::1]/",
        "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/", "http://[fd00:ec2::254]/",
        "http://100.64.0.1/", "http://224.0.0.1/", "http://2130706433/",
    ],
)  # fmt: skip
async def test_non_public_addresses_are_refused(url: str) -> None:
    with pytest.raises(fetching.UnsafeURL, match=r"not a public address|cannot resolve"):
        await fetching.resolve_public(url)


async def test_only_http_and_https(monkeypatch: pytest.MonkeyPatch) -> None:
    for url in ("file:///etc/passwd", "gopher://127.0.0.1/", "ftp://example.com/"):
        with pytest.raises(fetching.UnsafeURL, match="only http and https"):
            await fetching.resolve_public(url)


async def test_a_public_address_is_connected_to_as_checked() -> None:
    assert await fetching.resolve_public("http://93.184.215.14/x") == "93.184.215.14"
    assert await fetching.resolve_public("https://[2606:4700::1]:443/") == "2606:4700::1"


async def test_a_redirect_into_the_private_network_is_refused(
    internal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        with pytest.raises(fetching.UnsafeURL):
            await fetching.get(http, f"{internal}/page")
        # A trusted origin (as the sample site is) that redirects elsewhere: the hop is checked.
        _Pages.redirect_to = "http://169.254.169.254/latest/meta-data/"
        with pytest.raises(fetching.UnsafeURL, match=re.escape("169.254.169.254")):
            await fetching.get(http, f"{internal}/jump", trusted=frozenset({internal}))
        _Pages.redirect_to = "/page"  # ...and within it, followed
        page = await fetching.get(http, f"{internal}/jump", trusted=frozenset({internal}))
        assert SECRET in page.text and fetching.final_url(page) == f"{internal}/page"
        monkeypatch.setenv(fetching.ALLOW_PRIVATE, "1")  # the operator says so
        assert SECRET in (await fetching.get(http, f"{internal}/page")).text


class _Bomb(BaseHTTPRequestHandler):
    """A page whose gzip body is ~10 MB and expands to 10 GB of zeros (one gzip member, valid
    to its trailer): built from one compressed megabyte repeated (each flushed in full, so the
    compressed bytes of every megabyte after the first are the same)."""

    GIGABYTES = 10

    def do_GET(self) -> None:
        mb = b"\0" * (1 << 20)
        z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        head = z.compress(mb) + z.flush(zlib.Z_FULL_FLUSH)
        each = z.compress(mb) + z.flush(zlib.Z_FULL_FLUSH)
        n = self.GIGABYTES * 1024
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        try:
            self.wfile.write(head)
            for _ in range(n - 1):
                self.wfile.write(each)
            crc = 0
            for _ in range(n):
                crc = zlib.crc32(mb, crc)
            self.wfile.write(z.flush()[:-8] + struct.pack("<II", crc, (n << 20) & 0xFFFFFFFF))
        except OSError:
            pass  # the client stopped reading: what the test wants

    def log_message(self, *args: object) -> None:
        pass


_FETCH = """
import asyncio, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # 3 GB: far under the bomb
from genx_ray.examples.onboard import fetch_page
page = asyncio.run(fetch_page(sys.argv[1]))
print(len(page.text), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)  # MB
"""


def test_a_gzip_bomb_is_cut_at_the_page_limit_not_expanded(tmp_path: Any) -> None:
    """A 10 MB gzip of zeros served by a local HTTP server (GENX_ALLOW_PRIVATE_URLS=1): the
    crawler reads it as a stream, decompresses at most MAX_PAGE_BYTES and stops (today it
    expands all 10 GB in the run host, which carries other tenants' runs)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Bomb)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, fetching.ALLOW_PRIVATE: "1"}
    env.pop("OPENAI_BASE_URL", None)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _FETCH, f"http://127.0.0.1:{server.server_address[1]}/"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-2000:]
    text, peak_mb = (int(n) for n in done.stdout.split())
    assert text == 4000  # the page's text, cut as any page's is
    assert peak_mb < 600, peak_mb  # the process, imports included: nowhere near 10 GB


async def test_a_deflate_or_multi_member_gzip_reads_as_sent_up_to_the_limit() -> None:
    body = b"<html>" + b"x" * 5000 + b"</html>"
    half = len(body) // 2
    members = gzip.compress(body[:half]) + gzip.compress(body[half:])
    for encoding, raw in (("gzip", members), ("deflate", zlib.compress(body)), ("identity", body)):
        response = httpx.Response(
            200, headers={"Content-Encoding": encoding}, stream=httpx.ByteStream(raw)
        )
        assert await fetching.read_limited(response, 100_000) == body
        response = httpx.Response(
            200, headers={"Content-Encoding": encoding}, stream=httpx.ByteStream(raw)
        )
        assert await fetching.read_limited(response, 100) == body[:100]
    with pytest.raises(UserError, match="not asked for"):
        await fetching.read_limited(httpx.Response(200, headers={"Content-Encoding": "br"}), 10)


def test_an_onboarding_run_never_reads_an_internal_page(sim: Sim, internal: str) -> None:
    handle = start(onboard, {"url": f"{internal}/page", "max_pages": 2, "questions_per_page": 0})
    report = handle.result(120).model_dump()
    assert report["pages"] == 0 and SECRET not in str(report)
    entries = list(handle.events(follow=False))
    assert SECRET not in "".join(e.data for e in entries)  # every event as stored
    refused = [e.event for e in entries if e.type == "progress"]
    errors = [e.data["error"] for e in refused if e.kind == "crawl.error"]  # type: ignore[union-attr]
    assert errors and "not a public address" in errors[0]


def test_the_input_schema_bounds_what_one_request_may_cost() -> None:
    schema = OnboardInput.model_json_schema()["properties"]
    assert schema["max_pages"]["maximum"] == 100 and schema["questions_per_page"]["maximum"] == 20
    assert "2101 LLM calls" in schema["questions_per_page"]["description"]
    assert "public addresses only" in schema["url"]["description"]
    for bad in ({"max_pages": 101}, {"url": "file:///etc/passwd"}, {"url": "x" * 3000}):
        with pytest.raises(ValidationError):
            OnboardInput.model_validate(bad)
