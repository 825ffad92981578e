from __future__ import annotations

import os


def test_bootstrap_twice_is_harmless(ray_local: None, redis_url: str) -> None:
    import ray

    from genx_ray.compute import NAMESPACE, ensure_ray

    before = ray.get_runtime_context().get_job_id()
    ensure_ray("local", redis_url=redis_url)
    ensure_ray()
    assert ray.get_runtime_context().get_job_id() == before
    assert ray.get_runtime_context().namespace == NAMESPACE

    @ray.remote(num_cpus=0)
    def env() -> str | None:
        return os.environ.get("GENX_REDIS_URL")

    assert ray.get(env.remote()) == redis_url  # workers use the caller's Redis
