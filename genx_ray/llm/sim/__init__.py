"""``genx sim``: an OpenAI-compatible server for tests, demos and benchmarks, with what makes
real providers hard (latency, caps answered with 429, errors, outages) and OpenAI's Batch API.
See :mod:`._app` (the online endpoints), :mod:`._answers` (what it answers), :mod:`._batches`."""

from genx_ray.llm.sim._app import MODELS, SAMPLE_SITE, SimConfig, SimStats, create_sim

__all__ = ["MODELS", "SAMPLE_SITE", "SimConfig", "SimStats", "create_sim"]
