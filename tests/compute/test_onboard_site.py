"""The onboarding example over the sample site, the whole workflow in a script run: its placed
items (the enrichment map) run on the local Ray."""

from __future__ import annotations

from llm.conftest import Sim

from genx_ray import start
from genx_ray.examples.onboard import onboard


def test_the_sample_site_is_still_crawled(sim: Sim) -> None:
    report = start(onboard, {"max_pages": 3, "questions_per_page": 1}).result(120).model_dump()
    assert report["pages"] == 3
    # The first impression: each page summed up in its own sentences (the heading kept out), and
    # the brief opening with what the site says first.
    index = "Acme Robotics builds warehouse robots that pick, pack and sort parcels."
    assert report["facts"][0]["summary"].startswith(index)
    assert report["summary"].startswith(index)
