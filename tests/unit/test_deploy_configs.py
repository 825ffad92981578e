"""The deploy configs in clusters/ keep the promises the worker makes: a worker there uses the Redis
its gateways use (or refuses to start), and Kubernetes gives a draining worker the time its
--drain-timeout asks for."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"


def _drain_timeout(command: str) -> int:
    found = re.search(r"--drain-timeout[ =](\d+)", command)
    assert found, command
    return int(found.group(1))


def test_kuberay_gives_the_draining_worker_its_drain_timeout() -> None:
    ray_cluster = next(yaml.safe_load_all((CLUSTERS / "kuberay.yaml").read_text()))
    pod = ray_cluster["spec"]["headGroupSpec"]["template"]["spec"]
    (head,) = pod["containers"]
    start = " ".join(head["lifecycle"]["postStart"]["exec"]["command"])
    stop = " ".join(head["lifecycle"]["preStop"]["exec"]["command"])
    drain = _drain_timeout(start)
    # Kubernetes kills the pod after the grace period, preStop included: it must cover the drain
    # and the hand-back after it.
    assert pod["terminationGracePeriodSeconds"] >= drain + 30
    assert "kill -TERM" in stop and "kill -0" in stop  # preStop lasts as long as the drain
    assert "sleep 30" not in stop


def test_the_ray_up_worker_reads_its_redis_from_the_mounted_env_file(tmp_path: Path) -> None:
    config = yaml.safe_load((CLUSTERS / "aws.yaml").read_text())
    assert config["file_mounts"]["~/genx.env"] == "./genx.env"
    command = next(c for c in config["head_start_ray_commands"] if "genx worker" in c)
    assert "GENX_REDIS_URL=$GENX_REDIS_URL" not in command  # nothing sets it on the head
    # Run the command's own shell up to the worker (a stand-in `genx` that prints its Redis).
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "genx"
    stub.write_text('#!/bin/sh\necho "redis=$GENX_REDIS_URL ray=$GENX_RAY_ADDRESS $*"\n')
    stub.chmod(0o755)
    env = {"HOME": str(tmp_path), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    script = re.sub(r"\s*&\s*$", "", command)  # in the foreground, to read its log after

    (tmp_path / "genx.env").write_text("OPENAI_API_KEY=sk-test\n")
    refused = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "GENX_REDIS_URL" in refused.stderr

    (tmp_path / "genx.env").write_text("GENX_REDIS_URL=redis://shared:6379/0\n")
    subprocess.run(["sh", "-c", script], env=env, check=True)
    log = (tmp_path / "genx-worker.log").read_text()
    assert "redis=redis://shared:6379/0 ray=auto worker --address auto" in log
