"""``python -m genx_ray.cli``: the ``genx`` command."""

from genx_ray.cli import main

main()
