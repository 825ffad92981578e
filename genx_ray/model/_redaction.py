"""Secrets never leave the process in clear: what the run record, events, errors and logs keep
has every known secret masked.

Masked: run tokens (``gxt_...``, anywhere, and any ``token=`` query value), bearer credentials
(``bearer`` in any case), ``Basic`` credentials (base64 of ``user:password``), the password of
any URL (``redis://:pw@host``, ``https://user:pw@host``), and the values of the process's secret
settings: ``OPENAI_API_KEY``, ``GENX_TOKEN_SECRET``, ``GENX_API_KEY``, every key in
``GENX_API_KEYS``, any variable named ``*_API_KEY``, ``*_SECRET``, ``*_SECRET_KEY``,
``*_SECRET_ACCESS_KEY``, ``*_PRIVATE_KEY``, ``*_TOKEN`` or ``*_PASSWORD`` whose value is 8
characters or more, and the password in any variable holding a URL (``GENX_REDIS_URL``).

Where: text made from an exception (:class:`genx_ray.model.ErrorInfo`: a message or traceback
that quotes a key), every log record (:mod:`genx_ray.observe._logs`), and every event a run
emits and its output (:func:`redact_json`, applied to the JSON as it is made: publish data,
step outputs, ``input.received``, run output). What must stay true:

- Masking comes before any cut: a secret crossing a length limit never leaks its prefix.
- Masking JSON text keeps it valid JSON with the same structure (a secret is replaced inside
  its string, in its escaped form too).
- It is cheap: the secret values are gathered again only when the environment changes (its
  size, or the value of a variable already known to hold a secret), and each text is one scan.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re

REDACTED = "[redacted]"
_SECRET_NAMES = re.compile(
    r".*(_API_KEY|_SECRET|_SECRET_KEY|_SECRET_ACCESS_KEY|_PRIVATE_KEY|_TOKEN|_PASSWORD)$"
)
_MIN_SECRET = 8  # shorter values would mask ordinary words
_URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@\"'\\]*:([^@\s/\"'\\]+)@")
# Each shape: (a substring any match contains, its pattern, the replacement). A shape is looked
# for only in a text that has its clue (a substring test), so most texts cost a few of those.
_SHAPES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("gxt_", re.compile(r"gxt_[A-Za-z0-9_.-]*"), "gxt_" + REDACTED),  # a run token
    ("token=", re.compile(r"([?&]token=)[^&\s\"'\\]+"), r"\1" + REDACTED),  # in a query
    ("bearer", re.compile(r"(?i)(bearer\s+)[^\s\"',\\]+"), r"\1" + REDACTED),  # any case
    (
        "://",
        re.compile(r"(://[^/\s:@\"'\\]*:)[^@\s/\"'\\]+(?=@)"),
        r"\1" + REDACTED,
    ),  # a URL's password
)
_BASIC = re.compile(r"(Basic\s+)([A-Za-z0-9+/]{4,}={0,2})")

# (the environment's fingerprint, the names seen holding secrets, the values, longest first)
_cache: tuple[tuple[object, ...], tuple[bytes, ...], tuple[str, ...]] | None = None
_env: dict[bytes, bytes] = getattr(os.environ, "_data", {})  # POSIX: the bytes behind environ


def _secret_values() -> tuple[tuple[bytes, ...], set[str]]:
    names: list[bytes] = []
    values: set[str] = set()
    for name, value in os.environ.items():
        if name == "GENX_API_KEYS":  # key:tenant pairs, comma-separated
            names.append(name.encode())
            values.update(pair.rpartition(":")[0].strip() for pair in value.split(","))
        elif _SECRET_NAMES.match(name):
            names.append(name.encode())
            values.add(value.strip())
        elif "://" in value and (found := _URL_PASSWORD.search(value)):
            names.append(name.encode())
            values.add(found.group(1))
    values = {v for v in values if len(v) >= _MIN_SECRET}
    # In JSON a value may appear escaped: its escaped form is masked too.
    values |= {json.dumps(v)[1:-1] for v in values}
    return tuple(sorted(names)), values


def _fingerprint(names: tuple[bytes, ...]) -> tuple[object, ...]:
    return (len(_env), *(_env.get(n) for n in names)) if _env else (os.environ.copy(),)


def _values() -> tuple[str, ...]:
    """Every secret value of the environment, longest first (gathered again when the
    environment changed)."""
    global _cache
    if _cache is not None and _fingerprint(_cache[1]) == _cache[0]:
        return _cache[2]
    names, values = _secret_values()
    ordered = tuple(sorted(values, key=len, reverse=True))
    _cache = (_fingerprint(names), names, ordered)
    return ordered


def _basic(match: re.Match[str]) -> str:
    """``Basic xyz`` masked when xyz is the base64 of ``user:password`` ("basic English" stays)."""
    try:
        decoded = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        return match.group(0)
    return match.group(1) + REDACTED if b":" in decoded else match.group(0)


def redact(text: str) -> str:
    """``text`` with every run token, credential and secret setting's value masked."""
    for value in _values():
        if value in text:
            text = text.replace(value, REDACTED)
    lowered = None
    for clue, pattern, replacement in _SHAPES:
        if clue == "bearer":
            lowered = text.lower()
            if clue not in lowered:
                continue
        elif clue not in text:
            continue
        if pattern.search(text):  # a search is several times cheaper than a sub finding nothing
            text = pattern.sub(replacement, text)
    if "Basic" in text:
        text = _BASIC.sub(_basic, text)
    return text


def redact_json(text: str) -> str:
    """JSON text with every secret masked inside its strings: still valid JSON, same shape
    (no shape crosses a quote or a backslash, and escaped secret values are masked too)."""
    return redact(text)
