from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from genx_ray.llm.sim import SimConfig, create_sim
from genx_ray.store import free_port


class Sim:
    """The simulator, serving over real HTTP from a thread, for the whole session."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(create_sim(SimConfig(latency_ms=20)), port=self.port,
                                log_level="warning")  # fmt: skip
        self.server = uvicorn.Server(config)
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    def configure(self, **changes: Any) -> None:
        httpx.post(f"http://127.0.0.1:{self.port}/sim/reset")
        defaults = SimConfig(latency_ms=20).model_dump()
        httpx.post(f"http://127.0.0.1:{self.port}/sim/config", json={**defaults, **changes})

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"http://127.0.0.1:{self.port}/sim/stats").json()
        return result


@pytest.fixture(scope="session")
def sim_server() -> Iterator[Sim]:
    sim = Sim()
    yield sim
    sim.server.should_exit = True


@pytest.fixture
def sim(sim_server: Sim, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Sim:
    sim_server.configure()
    monkeypatch.setenv("OPENAI_API_KEY", "sim-key")
    monkeypatch.setenv("OPENAI_BASE_URL", sim_server.base_url)
    monkeypatch.delenv("GENX_LLM_LIMITS", raising=False)
    return sim_server
