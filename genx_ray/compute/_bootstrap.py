"""Ray bootstrap: connect to ``GENX_RAY_ADDRESS`` or start a quiet local Ray, once per process.

``local`` (the default: ``genx dev``, ``genx demo``, scripts and notebooks) starts a private Ray
for this process, even where a cluster runs. Every other address joins a running cluster or
fails at once with a :class:`~genx_ray.model._errors.ConfigError` naming ``GENX_RAY_ADDRESS`` and what
was tried; none falls back to a private Ray (a worker that meant to join a cluster and silently
ran alone would keep its runs off the cluster):

- ``auto``: the cluster ``RAY_ADDRESS`` names, else the one ``ray start`` last started on this
  machine;
- ``host:port`` (the head's GCS) or ``ray://host:port`` (Ray Client): that one. Ray itself
  would retry an address where nothing listens for ever, so its port is tried first.

Ray is imported here lazily: the gateway imports genx_ray (events, runs, workflow definitions)
and must never import Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from genx_ray.model import ConfigError, Settings

NAMESPACE = "genx"
_lock = threading.Lock()


def ensure_ray(address: str | None = None, *, redis_url: str | None = None) -> None:
    """Connect this process to Ray unless it already is. Safe to call any number of times.

    ``address``: ``local`` starts a private local Ray (no dashboard, Ray's own logs kept at
    WARNING); ``auto``, ``host:port`` or ``ray://host:port`` joins a running cluster or raises
    :class:`ConfigError`. ``redis_url`` is passed to every Ray worker of this job, so tasks and
    actors use the same Redis as the caller.
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
        prefixes = ("GENX_", "OPENAI_", "OTEL_")  # OTEL_: their traces (genx_ray.observe._tracing)
        env_vars = {k: v for k, v in os.environ.items() if k.startswith(prefixes)}
        if redis_url:
            env_vars["GENX_REDIS_URL"] = redis_url
        if address != "local":
            _check_reachable(_join_target(address), address)
        try:
            ray.init(
                address=address,
                namespace=NAMESPACE,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=True,
                runtime_env={"env_vars": env_vars} if env_vars else None,
            )
        except ConnectionError as exc:
            raise ConfigError("GENX_RAY_ADDRESS", _join_failed(address, str(exc))) from None


# How long the port of a cluster to join may take to accept a connection.
CONNECT_SECONDS = 5.0


def _join_target(address: str) -> str:
    """The host:port joining ``address`` connects to first."""
    if address != "auto":
        return address.removeprefix("ray://")
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except ConnectionError as exc:
        raise ConfigError("GENX_RAY_ADDRESS", _join_failed(address, str(exc))) from None
    if not found:  # nothing recorded: ray.init says so (and fails) itself
        return ""
    return found


def _check_reachable(target: str, address: str) -> None:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS):
            pass
    except OSError as exc:
        raise ConfigError(
            "GENX_RAY_ADDRESS", _join_failed(address, f"nothing answers at {target} ({exc})")
        ) from None


def _join_failed(address: str, reason: str) -> str:
    if address == "auto":
        ray_address = os.environ.get("RAY_ADDRESS")
        tried = (
            f"RAY_ADDRESS={ray_address}"
            if ray_address
            else "RAY_ADDRESS (unset) and the cluster `ray start` last started on this machine"
        )
        where = f"'auto' joins a running Ray cluster; tried {tried}"
    else:
        where = f"{address!r}: no Ray cluster to join there"
    return (
        f"{where}: {reason}. Start one (`ray start --head --port=6380`), name its head "
        "(host:port), or set GENX_RAY_ADDRESS=local for a private Ray on this machine."
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
