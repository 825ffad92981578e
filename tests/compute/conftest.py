"""The compute lane: tests that need a local Ray (started once per session by ``ray_local``)."""

from llm.conftest import sim, sim_server  # noqa: F401 - the LLM simulator, for workflows that call it
