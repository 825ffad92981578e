"""The cluster configs in clusters/ stay consistent with the code: they parse, Ray's GCS is kept
off Redis's port, and every genx setting they pass is one the code knows and accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from genx_ray.model import Settings

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"
API_DOC = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()


def _env(doc: Any) -> dict[str, str]:
    """Every literal `name: GENX_..., value: ...` pair anywhere in a manifest."""
    found: dict[str, str] = {}
    if isinstance(doc, dict):
        if str(doc.get("name", "")).startswith("GENX_") and "value" in doc:
            found[doc["name"]] = str(doc["value"])
        for value in doc.values():
            found.update(_env(value))
    elif isinstance(doc, list):
        for value in doc:
            found.update(_env(value))
    return found


def test_kuberay_manifest() -> None:
    docs = list(yaml.safe_load_all((CLUSTERS / "kuberay.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["RayCluster", "Deployment", "Service"]
    ray_cluster, gateway = docs[0], docs[1]
    assert ray_cluster["spec"]["headGroupSpec"]["rayStartParams"]["port"] != "6379"
    assert '\\"llm\\"' in ray_cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]["resources"]
    command = gateway["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["genx", "gateway"]
    env = _env(docs)
    assert env and all(f"`{name}`" in API_DOC for name in env)  # documented settings only
    Settings.from_env({**env, "GENX_REDIS_URL": "redis://r:6379/0"})  # and valid values


def test_ray_up_config() -> None:
    config = yaml.safe_load((CLUSTERS / "aws.yaml").read_text())
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert re.search(r"--port=(\d+)", head_cmds).group(1) != "6379"  # type: ignore[union-attr]
    assert "genx worker --address auto" in head_cmds
    assert config["available_node_types"]["llm"]["resources"]["llm"] > 0
    workers = " ".join(config["worker_start_ray_commands"])
    assert ":6380" in workers and "--labels" in workers
