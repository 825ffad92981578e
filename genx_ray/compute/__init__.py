"""Compute: the only room that imports Ray.

Joining or starting a Ray cluster, the run hosts (detached async actors executing many runs
each) and how a worker places runs on them, the map actors that run the items of large maps
across the cluster, and placed components' attempts as Ray tasks. Every module imports Ray
lazily, inside functions: importing this room never imports Ray.
"""

from genx_ray.compute._bootstrap import NAMESPACE, cluster_cpus, ensure_ray, shutdown_ray
from genx_ray.compute._hosts import RunHosts
from genx_ray.compute._map_actors import actors_per_node, map_on_cluster, plan
from genx_ray.compute._placement import RayPlacement
from genx_ray.compute._tasks import run_as_task

__all__ = [
    "NAMESPACE",
    "RayPlacement",
    "RunHosts",
    "actors_per_node",
    "cluster_cpus",
    "ensure_ray",
    "map_on_cluster",
    "plan",
    "run_as_task",
    "shutdown_ray",
]
