"""A real Redis Cluster on this machine, for the tests: three masters with a replica each.

Six ``redis-server --cluster-enabled yes`` processes on free ports in a temporary directory (each
with its cluster bus on a port of its own; nothing kept on disk, like the tests' single Redis: a
replica has its data from its master, by replication), joined by ``redis-cli --cluster create``. Like
:class:`genx_ray.store._embedded.EmbeddedRedis` they die with the process that started them (the kernel
kills them if it is killed). A small ``cluster-node-timeout`` lets a replica take over from a
killed master within seconds, which :meth:`LocalRedisCluster.kill_master_of` is for.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

import redis

from genx_ray.store import die_with_parent, free_port


def cluster_tools() -> tuple[str, str] | None:
    """``redis-server`` and ``redis-cli`` (Debian: redis-server, redis-tools), if both exist."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (server, cli) if server and cli else None


@dataclass
class Node:
    port: int
    bus_port: int
    proc: subprocess.Popen[bytes]


class LocalRedisCluster:
    """``start()`` returns a URL of one of its nodes (any node will do for a cluster client)."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000) -> None:
        self.masters, self.replicas = masters, replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: dict[int, Node] = {}
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{min(self.nodes)}/0"

    def start(self, timeout: float = 30.0) -> str:
        tools = cluster_tools()
        if tools is None:
            raise RuntimeError(
                "a Redis Cluster for the tests needs redis-server and redis-cli: "
                "apt-get install redis-server redis-tools"
            )
        server, cli = tools
        self._dir = tempfile.TemporaryDirectory(prefix="genx-redis-cluster-")
        for _ in range(self.masters * (1 + self.replicas)):
            self._spawn(server)
        deadline = time.monotonic() + timeout
        for port in self.nodes:
            self._wait(port, deadline, lambda c: bool(c.ping()))
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=timeout,
        )  # fmt: skip
        self.wait_healthy(deadline - time.monotonic())
        return self.url

    def _spawn(self, server: str, port: int | None = None, bus_port: int | None = None) -> None:
        assert self._dir is not None
        port, bus_port = port or free_port(), bus_port or free_port()
        workdir = os.path.join(self._dir.name, str(port))
        os.makedirs(workdir, exist_ok=True)
        proc = subprocess.Popen(
            [server, "--port", str(port), "--cluster-port", str(bus_port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms),
             # A replica takes over however long it was cut off from its master.
             "--cluster-replica-validity-factor", "0",
             "--save", "", "--appendonly", "no",
             "--dir", workdir, "--loglevel", "warning", "--logfile", "redis.log"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        self.nodes[port] = Node(port, bus_port, proc)

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1,
                           decode_responses=True)  # fmt: skip

    def _wait(self, port: int, deadline: float, ready: object) -> None:
        while True:
            try:
                with self._client(port) as c:
                    if ready(c):  # type: ignore[operator]
                        return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis cluster node {port} not ready")
            time.sleep(0.05)

    def alive(self) -> list[int]:
        return [p for p, n in self.nodes.items() if n.proc.poll() is None]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node sees the cluster as ok, with a master for each shard and every live
        replica in sync with it."""
        deadline = time.monotonic() + timeout

        def ok(c: redis.Redis) -> bool:
            info = c.execute_command("CLUSTER", "INFO")
            info = info if isinstance(info, dict) else dict(
                line.split(":", 1) for line in str(info).splitlines() if ":" in line)  # fmt: skip
            if info.get("cluster_state") != "ok":
                return False
            role = c.info("replication")
            return role["role"] == "master" or role.get("master_link_status") == "up"

        for port in self.alive():
            self._wait(port, deadline, ok)

    def master_of(self, key: str) -> int:
        """The port of the master that holds ``key``'s slot now."""
        with self._client(self.alive()[0]) as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise LookupError(f"no master serves the slot of {key!r}")

    def kill(self, port: int) -> None:
        """kill -9 one node."""
        proc = self.nodes[port].proc
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def kill_master_of(self, key: str) -> int:
        """kill -9 the master holding ``key``; returns its port. Its replica takes over after
        the node timeout (and a second or two of election)."""
        port = self.master_of(key)
        self.kill(port)
        return port

    def flush(self) -> None:
        """Empty every master (between test modules sharing the cluster)."""
        for port in self.alive():
            with self._client(port) as c:
                if c.info("replication")["role"] == "master":
                    c.flushall()

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes.values():
            try:
                node.proc.wait(5)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        self.nodes.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
