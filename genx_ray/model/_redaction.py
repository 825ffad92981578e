"""Secrets never leave the process in clear: what the run record, events, errors and logs keep
has every known secret masked.

Masked: run tokens (``gxt_...``, anywhere, and any ``token=`` query value), bearer credentials,
and the values of the process's secret settings: ``OPENAI_API_KEY``, ``GENX_TOKEN_SECRET``,
``GENX_API_KEY``, every key in ``GENX_API_KEYS``, and any variable named ``*_API_KEY``,
``*_SECRET``, ``*_TOKEN`` or ``*_PASSWORD`` whose value is 8 characters or more. It applies
where text is made from an exception (:class:`genx_ray.model.ErrorInfo`: a message or
traceback that quotes a key) and to every log record (:mod:`genx_ray.observe._logs`).
"""

from __future__ import annotations

import os
import re

REDACTED = "[redacted]"
_TOKENS = re.compile(r"gxt_[A-Za-z0-9_.-]*|(?<=[?&]token=)[^&\s\"']+|(?<=Bearer )[^\s\"',]+")
_SECRET_NAMES = re.compile(r".*(_API_KEY|_SECRET|_TOKEN|_PASSWORD)$")
_MIN_SECRET = 8  # shorter values would mask ordinary words

_cache: tuple[tuple[tuple[str, str], ...], re.Pattern[str] | None] = ((), None)


def _secrets_pattern() -> re.Pattern[str] | None:
    """One pattern of every secret value in the environment (rebuilt when it changes)."""
    global _cache
    named = tuple(sorted((k, v) for k, v in os.environ.items() if _SECRET_NAMES.match(k) or
                         k == "GENX_API_KEYS"))  # fmt: skip
    if named == _cache[0]:
        return _cache[1]
    values: set[str] = set()
    for name, value in named:
        if name == "GENX_API_KEYS":  # key:tenant pairs, comma-separated
            values.update(pair.rpartition(":")[0].strip() for pair in value.split(","))
        else:
            values.add(value.strip())
    values = {v for v in values if len(v) >= _MIN_SECRET}
    pattern = (
        re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))
        if values
        else None
    )
    _cache = (named, pattern)
    return pattern


def redact(text: str) -> str:
    """``text`` with every run token, bearer credential and secret setting's value masked."""
    text = _TOKENS.sub(REDACTED, text)
    pattern = _secrets_pattern()
    return pattern.sub(REDACTED, text) if pattern is not None else text
