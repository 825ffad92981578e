"""Values crossing Redis: JSON encoding by type, and the canonical hash of a step's input."""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any, get_type_hints

from pydantic import TypeAdapter
from pydantic_core import to_jsonable_python


def to_json(value: Any) -> Any:
    """A JSON-able form of ``value`` (pydantic models, dataclasses, datetimes... included)."""
    return to_jsonable_python(value, fallback=repr)


def dump_value(value: Any) -> str:
    return json.dumps(to_json(value), separators=(",", ":"), ensure_ascii=False)


def canonical_hash(*parts: Any) -> str:
    """A stable digest of JSON-able content: the same input always gives the same hash,
    whatever the dict order, in any process."""
    blob = json.dumps(to_json(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class Codec:
    """Encodes values of one type to JSON and decodes them back (e.g. a journaled result
    into the pydantic model the component returns)."""

    def __init__(self, annotation: Any) -> None:
        self.annotation = annotation
        self._adapter: TypeAdapter[Any] | None = (
            None if annotation is Any else TypeAdapter(annotation)
        )

    def encode(self, value: Any) -> Any:
        if self._adapter is None:
            return to_json(value)
        return self._adapter.dump_python(value, mode="json")

    def decode(self, data: Any) -> Any:
        return data if self._adapter is None else self._adapter.validate_python(data)

    def schema(self) -> dict[str, Any]:
        return {} if self._adapter is None else self._adapter.json_schema()


def type_hints(fn: Any) -> dict[str, Any]:
    """``get_type_hints`` that also resolves names local to where ``fn`` was decorated (a model
    defined inside a function or a notebook cell's scope), looking through the caller's frames."""
    try:
        return get_type_hints(fn)
    except NameError:
        pass
    frame = sys._getframe(1)
    localns: dict[str, Any] = {}
    for _ in range(8):
        if frame.f_back is None:
            break
        frame = frame.f_back
        localns = {**frame.f_locals, **localns}
        try:
            return get_type_hints(fn, localns=localns)
        except NameError:
            continue
    return get_type_hints(fn, localns=localns)
