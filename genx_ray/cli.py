"""The ``genx`` command. Each subcommand imports what it needs, so ``genx --help`` stays fast and
``genx gateway`` never imports Ray."""

from __future__ import annotations

import typer

from genx_ray.errors import GenxError

app = typer.Typer(
    name="genx",
    help="genx-ray: durable LLM and agent workflows on Ray, served as REST APIs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def info() -> None:
    """Show the configuration this machine resolves to (Redis, Ray, workflows)."""
    from genx_ray.connections import resolve_redis_url
    from genx_ray.settings import Settings

    settings = Settings.from_env()
    typer.echo(f"redis:     {resolve_redis_url(settings)}")
    typer.echo(f"ray:       {settings.ray_address}")
    typer.echo(f"workflows: {', '.join(settings.workflows)}")
    typer.echo(f"auth:      {'bearer keys' if settings.api_keys else 'open (single tenant)'}")


def main() -> None:
    try:
        app()
    except GenxError as exc:
        typer.secho(f"genx: {exc}", err=True, fg=typer.colors.RED)
        raise SystemExit(2) from None
