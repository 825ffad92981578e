"""Secrets never leave the process in clear: what the run record, events, errors and logs keep
has every known secret masked.

Masked: run tokens (``gxt_...``, anywhere, and any ``token=`` query value), bearer credentials,
and the values of the process's secret settings: ``OPENAI_API_KEY``, ``GENX_TOKEN_SECRET``,
``GENX_API_KEY``, every key in ``GENX_API_KEYS``, and any variable named ``*_API_KEY``,
``*_SECRET``, ``*_TOKEN`` or ``*_PASSWORD`` whose value is 8 characters or more. It applies
where text is made from an exception (:class:`genx_ray.events.ErrorInfo`: a message or
traceback that quotes a key) and to every log record of the loggers :func:`install` names.
"""

from __future__ import annotations

import logging
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


def _masked(arg: object) -> object:
    """A log argument, masked: text, or an object whose text has a secret (httpx logs URLs)."""
    if isinstance(arg, int | float | None):
        return arg
    text = arg if isinstance(arg, str) else str(arg)
    masked = redact(text)
    return arg if masked == text else masked


def redact_record(record: logging.LogRecord) -> None:
    """Mask secrets in a log record: its arguments (the format string stays as it is: masking a
    ``token=%s`` in it would break it), else its message, and any exception's text."""
    if isinstance(record.args, tuple) and record.args:
        record.args = tuple(_masked(a) for a in record.args)
    elif isinstance(record.args, dict) and record.args:
        record.args = {k: _masked(v) for k, v in record.args.items()}
    elif isinstance(record.msg, str):
        record.msg = redact(record.msg)
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))


# The loggers whose records are masked: genx-ray's own, the server it runs and the HTTP client
# it calls with (uvicorn's access log and httpx's request log write each request's path and
# query, where run tokens travel as ?token=).
MASKED = ("genx_ray", "gateway", "uvicorn", "httpx", "httpcore")
_installed = False


def install() -> None:
    """Mask secrets in every record of the :data:`MASKED` loggers, wherever they are handled:
    the record factory masks them as they are made (a logger's filter would miss its children's
    records, a handler's the handlers added later). Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    make = logging.getLogRecordFactory()

    def masked(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if record.name.startswith(MASKED):
            redact_record(record)
        return record

    logging.setLogRecordFactory(masked)
