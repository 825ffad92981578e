"""Ray bootstrap: connect to ``GENX_RAY_ADDRESS`` or start a quiet local Ray, once per process.

Ray is imported here lazily: the gateway imports genx_ray (events, runs, workflow definitions)
and must never import Ray.
"""

from __future__ import annotations

import logging
import os
import threading

from genx_ray.settings import Settings

NAMESPACE = "genx"
_lock = threading.Lock()


def ensure_ray(address: str | None = None, *, redis_url: str | None = None) -> None:
    """Connect this process to Ray unless it already is. Safe to call any number of times.

    ``address``: ``local`` starts a private local Ray (no dashboard, Ray's own logs kept at
    WARNING); ``auto`` or ``host:port`` joins a running cluster. ``redis_url`` is passed to every
    Ray worker of this job, so tasks and actors use the same Redis as the caller.
    """
    import ray

    if ray.is_initialized():
        return
    with _lock:
        if ray.is_initialized():
            return
        address = address or Settings.current().ray_address
        # No usage-stats prompt or upload (there is no internet here, and it is not ours to send).
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Tasks and run hosts read the same configuration as the process that started them.
        env_vars = {k: v for k, v in os.environ.items() if k.startswith(("GENX_", "OPENAI_"))}
        if redis_url:
            env_vars["GENX_REDIS_URL"] = redis_url
        ray.init(
            address=None if address == "auto" else address,
            namespace=NAMESPACE,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
            runtime_env={"env_vars": env_vars} if env_vars else None,
        )


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cluster_cpus() -> int:
    """The CPUs of the Ray cluster this process joined (1 if it has not joined one)."""
    import ray

    if not ray.is_initialized():
        return 1
    return int(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]
