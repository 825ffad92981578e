"""Workflows: components composed in plain async Python, registered by name.

A workflow's input is one pydantic model parameter, or else the function's parameters taken as
the fields of an object (``async def wf(url: str, depth: int = 2)`` takes ``{"url": ...}``).
Its output is whatever the return annotation says. Both give the JSON schemas the API shows.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast, overload

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model

from genx_ray.model import (
    Codec,
    Concurrency,
    InputInvalid,
    UserError,
    WorkflowNotFound,
    check_priority,
    type_hints,
)

if TYPE_CHECKING:
    from genx_ray.flow._children import ChildRun

P = ParamSpec("P")
R = TypeVar("R")


class Workflow(Generic[P, R]):
    """Components composed in plain async Python, served by name: build one with
    :func:`workflow`. Its input and output types give the JSON schemas the API shows."""

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]],
        *,
        name: str | None = None,
        description: str | None = None,
        concurrency: Concurrency | None = None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise UserError(f"@workflow needs an async function; {fn.__qualname__} is not one")
        self.fn = fn
        self.concurrency = concurrency
        self.child_priority: int | None = None  # None: a child run takes its parent's
        self.name = name or fn.__name__.replace("_", "-")
        if not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise UserError(f"workflow name {self.name!r}: use letters, digits, '-', '_', '.'")
        doc = inspect.getdoc(fn) or ""
        self.description = description if description is not None else doc.split("\n\n")[0]
        hints = type_hints(fn)
        params = list(inspect.signature(fn).parameters.values())
        first = hints.get(params[0].name) if params else None
        if len(params) == 1 and isinstance(first, type) and issubclass(first, BaseModel):
            self.input_model: type[BaseModel] = first
            self._spread = False
        else:
            fields: dict[str, Any] = {
                p.name: (hints.get(p.name, Any), ... if p.default is p.empty else p.default)
                for p in params
            }
            model_name = "".join(w.capitalize() for w in self.name.replace(".", "-").split("-"))
            self.input_model = create_model(
                f"{model_name}Input", __config__=ConfigDict(extra="forbid"), **fields
            )
            self._spread = True
        self._input = TypeAdapter(self.input_model)
        self.output = Codec(hints.get("return", Any))

    def parse_input(self, raw: Any) -> BaseModel:
        """Validate a JSON input; :class:`InputInvalid` says which field is wrong."""
        if raw is None and self._spread:
            raw = {}
        try:
            return self._input.validate_python(raw)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False)
            first = errors[0] if errors else {"loc": (), "msg": str(exc)}
            where = ".".join(str(p) for p in first["loc"]) or "input"
            raise InputInvalid(
                f"{self.name}: {where}: {first['msg']}", errors=cast(list[Any], errors)
            ) from None

    def encode_input(self, value: Any) -> Any:
        """A validated input (model instance, dict or JSON value) as JSON."""
        return self._input.dump_python(self.parse_input(value), mode="json")

    async def invoke(self, inp: BaseModel) -> R:
        fn = cast(Callable[..., Awaitable[R]], self.fn)
        if self._spread:
            return await fn(**{k: getattr(inp, k) for k in type(inp).model_fields})
        return await fn(inp)

    def input_schema(self) -> dict[str, Any]:
        return self.input_model.model_json_schema()

    def output_schema(self) -> dict[str, Any]:
        return self.output.schema()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_schema(),
            "output_schema": self.output_schema(),
        }

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        """Call the body directly: as a sub-workflow inside a run its steps join the run."""
        return self.fn(*args, **kwargs)

    def with_priority(self, priority: int) -> Workflow[P, R]:
        """This workflow, whose child runs (:meth:`start_child`, :meth:`run_child`) wait in the
        run queue at ``priority`` (1 most urgent .. 5) instead of their parent's:
        ``await digest.with_priority(1).run_child(...)``. :class:`InputInvalid` for another
        value."""
        told = copy.copy(self)
        told.child_priority = check_priority(priority)
        return told

    def start_child(self, *args: Any, **kwargs: Any) -> Awaitable[ChildRun[R]]:
        """Inside a run: start this workflow as a child run of its own (own id and stream,
        ``parent_id`` on it), journaled so a restarted parent does not start it twice. Returns
        its :class:`~genx_ray.flow._children.ChildRun` at once; ``await child.result()`` when you
        want its output. Takes the workflow's input as the workflow does (a model, or its
        fields as keywords)."""
        from genx_ray.flow._children import start_child

        return start_child(self, self._child_input(args, kwargs))

    async def run_child(self, *args: Any, **kwargs: Any) -> R:
        """Inside a run: start this workflow as a child run and wait for its output (the parent
        holds no host meanwhile); :class:`~genx_ray.model.ChildFailed` if it did not succeed."""
        child = await self.start_child(*args, **kwargs)
        return await child.result()

    def _child_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) == 1 and not kwargs and isinstance(args[0], BaseModel | dict):
            return args[0]
        names = list(self.input_model.model_fields)
        if len(args) > len(names):
            raise UserError(f"{self.name}: {len(args)} positional inputs for {len(names)} fields")
        return {**dict(zip(names, args, strict=False)), **kwargs}

    def __repr__(self) -> str:
        return f"<workflow {self.name}>"


class Registry:
    """Workflows by name. ``@workflow`` registers into :data:`registry` unless told otherwise."""

    def __init__(self, *workflows: Workflow[Any, Any]) -> None:
        self._workflows: dict[str, Workflow[Any, Any]] = {}
        for wf in workflows:
            self.add(wf)

    def add(self, wf: Workflow[Any, Any]) -> None:
        # Re-registering a name replaces it: a notebook cell run twice must not fail.
        self._workflows[wf.name] = wf

    def get(self, name: str) -> Workflow[Any, Any]:
        try:
            return self._workflows[name]
        except KeyError:
            raise WorkflowNotFound(name) from None

    def __iter__(self) -> Any:
        return iter(sorted(self._workflows.values(), key=lambda w: w.name))

    def __contains__(self, name: str) -> bool:
        return name in self._workflows

    def load(self, modules: Iterable[str]) -> Registry:
        """Import modules for their ``@workflow`` side effects."""
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise UserError(f"GENX_WORKFLOWS: cannot import {module!r}: {exc}") from exc
        return self


registry = Registry()


@overload
def workflow(fn: Callable[P, Awaitable[R]], /) -> Workflow[P, R]: ...
@overload
def workflow(
    *,
    name: str | None = None,
    description: str | None = None,
    registry: Registry | None = None,
    concurrency: Concurrency | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Workflow[P, R]]: ...
def workflow(
    fn: Any = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    registry: Registry | None = None,
    concurrency: Concurrency | None = None,
) -> Any:
    """Make an async function a workflow, registered under ``name`` (default: the function's
    name with ``-`` for ``_``) so the gateway serves it at ``/v1/workflows/{name}/runs``.
    ``concurrency``: at most so many of its runs at once (per value of an input field)."""
    target = registry if registry is not None else globals()["registry"]

    def wrap(f: Callable[..., Awaitable[Any]]) -> Workflow[Any, Any]:
        wf: Workflow[Any, Any] = Workflow(
            f, name=name, description=description, concurrency=concurrency
        )
        target.add(wf)
        return wf

    return wrap(fn) if fn is not None else wrap
