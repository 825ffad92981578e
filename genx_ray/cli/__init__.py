"""The ``genx`` command line: serving (``dev``, ``gateway``, ``worker``, ``sim``, ``demo``) and
the API's client commands (``run``, ``runs``, ``schedules``). See :mod:`genx_ray.cli._commands`."""

from genx_ray.cli._commands import main

__all__ = ["main"]
