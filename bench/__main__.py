"""``python -m bench [suite ...]`` (``make bench``): run the benchmark suites, print figures."""

from __future__ import annotations

import importlib
import sys

SUITES = (
    "runtime",
    "gateway",
    "serving",
    "llm",
    "batch",
    "tracing",
    "redaction",
    "search",
    "strand",
    "flow",
)


def main(argv: list[str]) -> None:
    for name in argv or SUITES:
        if name not in SUITES:
            raise SystemExit(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
        print(f"\n== {name} ==", flush=True)
        importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
