"""Printing figures against their baseline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def row(label: str, per_item_s: float, baseline_s: float | None = None, unit: str = "us") -> None:
    scale = {"us": 1e6, "ms": 1e3}[unit]
    ratio = f"  x{per_item_s / baseline_s:,.1f} vs baseline" if baseline_s else "  (baseline)"
    print(f"  {label:<52} {per_item_s * scale:>10,.1f} {unit}/call{ratio}", flush=True)
