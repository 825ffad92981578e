"""This process's observer: metrics always, traces when the ``OTEL_*`` variables ask for them.

Made once per process (:func:`setup`, by whoever starts first: the gateway, a worker, a run host,
a map actor, a Ray task; a script's runs get one on first use). The engine gets it from here or,
inside a run, from the run's context.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from genx_ray.observe._metrics import Metrics
from genx_ray.observe._observer import Observer, Observers
from genx_ray.observe._tracing import Tracing, configure

_lock = threading.Lock()
_observer: Observer | None = None


def setup(role: str) -> Observer:
    """This process's observer, made once (later calls return it): Prometheus metrics always,
    and traces when the ``OTEL_*`` variables ask for them (``role`` names the process in them:
    gateway, worker, run-host, map-actor, task, script)."""
    global _observer
    if _observer is not None:
        return _observer
    with _lock:
        if _observer is None:
            tracer = configure(role)
            metrics = Metrics()
            _observer = Observers(Tracing(tracer), metrics) if tracer is not None else metrics
        return _observer


def observer() -> Observer:
    """This process's observer (set up as a ``script`` if nothing set it up before)."""
    return _observer if _observer is not None else setup("script")


def use(replacement: Observer | None) -> Observer | None:
    """Observe with ``replacement`` from now on (None: set up again on next use); returns the
    one it replaces. For tests that capture spans in memory, not for production code."""
    global _observer
    with _lock:
        previous, _observer = _observer, replacement
    return previous


@contextmanager
def traced_into(provider: Any) -> Iterator[None]:
    """Trace into ``provider`` (an SDK ``TracerProvider``) for a while, besides the metrics:
    for tests that capture spans in memory. Not for production: configure with ``OTEL_*``."""
    previous = use(Observers(Tracing(provider.get_tracer("genx_ray")), Metrics()))
    try:
        yield
    finally:
        use(previous)
