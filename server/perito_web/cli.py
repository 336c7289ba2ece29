"""`perito web`: the web page, plugged in through the `perito.commands` entry point."""

from __future__ import annotations

import importlib.util
import os

import click

from perito.cli import server_option


@click.command("web")
@server_option(
    "host:port of the Perito gRPC service (env PERITO_SERVER). Each person signs in with "
    "their tenant's token; the page has no token of its own."
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to bind: an IPv4 or IPv6 address (::1 or [::1]) or a name (localhost: "
    "127.0.0.1 and ::1). Beyond loopback every session needs a token: in front of a service "
    "without tenants the page refuses to start there.",
)
@click.option("--port", default=8080, show_default=True, type=int, help="HTTP port, 0: any free.")
@click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False),
    envvar="PERITO_TLS_CA",
    help="CA certificate of a service that serves TLS (env PERITO_TLS_CA).",
)
def web(server: str, host: str, port: int, tls_ca: str | None) -> None:
    """Serve the web page: classify a photo, run a folder as a job, browse model cards.

    \b
    Example:
      perito web --server localhost:8500 --port 8080   # then open http://localhost:8080
    """
    import uvicorn

    from perito_core.listening import ListenError, bind_tcp, is_loopback, socket_names
    from perito_web.app import create_app

    tls = tls_ca is not None or os.environ.get("PERITO_TLS", "").lower() in ("1", "true", "yes")
    # Bound here rather than by uvicorn, which answers a busy port with sys.exit(1) after a
    # log line, binds one address of a name, and would print port 0 as asked.
    try:
        sockets = bind_tcp(host, port, "perito web")
    except ListenError as error:
        raise click.ClickException(str(error)) from None
    addresses = socket_names(sockets)
    loopback_only = all(is_loopback(sock.getsockname()[0]) for sock in sockets)
    if not loopback_only:
        try:
            _refuse_anonymous_service(server, addresses, tls, tls_ca)
        except click.ClickException:
            for sock in sockets:
                sock.close()
            raise
    app = create_app(
        server, tls=tls, root_certificates=tls_ca, loopback_only=loopback_only, addresses=addresses
    )
    pages = ", ".join(f"http://{address}" for address in addresses)
    click.echo(f"perito web: {pages} (service {server})")
    # Behind a TLS-terminating proxy, X-Forwarded-Proto makes session cookies Secure.
    config = uvicorn.Config(app, host=host, port=port, log_level="info", proxy_headers=True)
    uvicorn.Server(config).run(sockets=sockets)


def _refuse_anonymous_service(
    server: str, addresses: list[str], tls: bool, tls_ca: str | None
) -> None:
    """Refuse to serve the page beyond loopback in front of a service without tenants.

    Raises:
        click.ClickException: the service answers a call without a token. A service that
            cannot be reached now is let through: the page then refuses its sessions (401).
    """
    import asyncio

    import perito
    from perito_web.app import anonymous_beyond_loopback, opens_without_token

    async def ask() -> bool:
        async with perito.AsyncClient(
            server, timeout=10, max_retries=0, tls=tls, root_certificates=tls_ca
        ) as client:
            return await opens_without_token(client)

    try:
        anonymous = asyncio.run(ask())
    except perito.PeritoError as error:
        click.echo(
            f"perito web: could not ask {server} whether it needs a token ({error.code.name}); "
            "if it runs without tenants, the page will refuse sessions (401)",
            err=True,
        )
        return
    if anonymous:
        raise click.ClickException(
            "refusing to start: " + anonymous_beyond_loopback(server, addresses)
        )


def register(cli: click.Group) -> None:
    """Entry point for `perito.commands`: only where `perito[web]` is installed."""
    if all(importlib.util.find_spec(name) for name in ("starlette", "uvicorn", "multipart")):
        cli.add_command(web)
