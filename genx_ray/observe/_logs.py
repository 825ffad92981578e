"""Secrets never reach a log: every record of genx-ray's loggers, and of the server and HTTP
client it runs with, is masked as it is made (:func:`~genx_ray.model.redact`)."""

from __future__ import annotations

import logging

from genx_ray.model import redact


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


def install_log_masking() -> None:
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
