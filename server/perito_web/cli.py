"""`perito web`: the web page, plugged in through the `perito.commands` entry point."""

from __future__ import annotations

import importlib.util
import os

import click


@click.command("web")
@click.option(
    "--server",
    envvar="PERITO_SERVER",
    default="localhost:8500",
    show_default=True,
    help="host:port of the Perito gRPC service (env PERITO_SERVER; token from PERITO_TOKEN).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8080, show_default=True, type=int, help="HTTP port.")
def web(server: str, host: str, port: int) -> None:
    """Serve the web page: classify a photo, run a folder as a job, browse model cards.

    \b
    Example:
      perito web --server localhost:8500 --port 8080   # then open http://localhost:8080
    """
    import uvicorn

    from perito_web.app import create_app

    app = create_app(server, token=os.environ.get("PERITO_TOKEN") or None)
    click.echo(f"perito web: http://{host}:{port} (service {server})")
    uvicorn.run(app, host=host, port=port, log_level="info")


def register(cli: click.Group) -> None:
    """Entry point for `perito.commands`: only where `perito[web]` is installed."""
    if all(importlib.util.find_spec(name) for name in ("starlette", "uvicorn", "multipart")):
        cli.add_command(web)
