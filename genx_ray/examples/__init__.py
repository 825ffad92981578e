"""Built-in example workflows, served by default (``GENX_WORKFLOWS`` unset).

- ``onboard``: the main job. Crawl a site, extract every page with an LLM, enrich it with
  hundreds of calls, stream a write-up.
- ``article``: content generation. Research, outline, then every section written in parallel,
  its tokens streamed.
- ``digest``: summarize many documents in parallel (no LLM needed) and stream a report.
- ``hello``: the smallest workflow.
"""

from genx_ray.examples import content, digest, onboard

__all__ = ["content", "digest", "onboard"]
