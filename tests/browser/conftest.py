"""The browser tests' fixtures: a real stack (LLM simulator, worker and gateway processes, API keys
on) and Debian's headless Chromium driven by Playwright (never a downloaded browser).

The gateway can be restarted on its port mid-test (:meth:`Stack.restart_gateway`); a browser
that was following a run must then resume on its own.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers import wait_up

from genx_ray.store import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TESTS = os.path.dirname(os.path.dirname(__file__))
API_KEY = "browser-test-key"
TENANT = "acme"
CLI = [sys.executable, "-m", "genx_ray.cli"]
NDJSON = "application/x-ndjson"
SIM_LATENCY_MS = 400
# Each streamed word of an article section takes this long: the run streams for several
# seconds, long enough to reload the page twice and restart the gateway while it does.
SIM_CHUNK_DELAY_MS = 600


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Stack:
    """The LLM simulator, a worker (inline hosts) and a gateway, as processes on one Redis."""

    def __init__(self, redis_url: str) -> None:
        self.env = {
            **os.environ,
            "GENX_REDIS_URL": redis_url,
            "GENX_WORKFLOWS": "genx_ray.examples,browser.wf_viewer,wf_fixtures",
            "GENX_API_KEYS": f"{API_KEY}:{TENANT}",
            "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
            "OPENAI_API_KEY": "sim-key",
        }
        self.env.pop("GENX_TOKEN_SECRET", None)  # the secret Redis keeps: shared across restarts
        sim_port, self.port, app_port = free_port(), free_port(), free_port()
        # A web app on another origin, allowed by CORS (see serve_app)
        self.app_url = f"http://127.0.0.1:{app_port}"
        self.env["GENX_CORS_ORIGINS"] = self.app_url
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        self.env["OPENAI_BASE_URL"] = f"{self.sim_url}/v1"
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {API_KEY}"}
        self.sim = subprocess.Popen(
            [*CLI, "sim", "--port", str(sim_port), "--latency-ms", str(SIM_LATENCY_MS)],
            env=self.env,
        )
        self.worker = subprocess.Popen(
            [*CLI, "worker", "--hosts", "inline", "--drain-timeout", "2"], env=self.env
        )
        self.gateway = self._start_gateway()
        wait_up(f"{self.sim_url}/sim/stats", self.sim)
        httpx.post(f"{self.sim_url}/sim/config", json={"chunk_delay_ms": SIM_CHUNK_DELAY_MS})
        wait_up(f"{self.url}/healthz", self.gateway)

    def _start_gateway(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*CLI, "gateway", "--port", str(self.port)], env=self.env)

    def restart_gateway(self) -> None:
        """Stop the gateway (as a platform restarting it would: SIGTERM, then SIGKILL after a
        short grace) and start a new one on the same port."""
        _stop(self.gateway, grace=1.0)
        self.gateway = self._start_gateway()
        wait_up(f"{self.url}/healthz", self.gateway)

    def api(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx.Response:
        """A call with the API key."""
        headers = {**self.headers, **(headers or {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kw)

    def output_events(self, run_id: str) -> list[str]:
        """The data of the run's ``output`` events, as the API replays them (NDJSON)."""
        resp = self.api("GET", f"/v1/runs/{run_id}/events", headers={"Accept": NDJSON})
        events = [json.loads(line) for line in resp.text.splitlines()]
        assert events and events[-1]["type"].startswith("run."), resp.text[-500:]
        return [e["data"] for e in events if e["type"] == "output"]

    def serve_app(self, html: str) -> None:
        """Serve ``html`` as the index page of the web app origin (a thread, until the stack
        stops)."""
        root = tempfile.mkdtemp(prefix="genx-webapp-")
        with open(os.path.join(root, "index.html"), "w") as f:
            f.write(html)

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

        handler = functools.partial(Quiet, directory=root)
        port = int(self.app_url.rsplit(":", 1)[1])
        self.app_server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        threading.Thread(target=self.app_server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if hasattr(self, "app_server"):
            self.app_server.shutdown()
        for proc in (self.gateway, self.worker, self.sim):
            _stop(proc)


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[Stack]:
    s = Stack(redis_url)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless; the tests fail (never skip) without it."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: install it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    chromium = playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
    )
    try:
        yield chromium
    finally:
        chromium.close()
        playwright.stop()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page that records CSP violations (``window.__violations``) from its first script."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(
        "window.__violations = [];"
        "document.addEventListener('securitypolicyviolation',"
        " e => window.__violations.push(e.violatedDirective));"
    )
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()
