"""What a command plugged into the `perito` command line uses to behave like the built-in ones.

A package adds commands to `perito` through the `perito.commands` entry point group: each
entry point names a function `register(cli: click.Group) -> None` that adds its commands to
the `perito` group (see `perito_web.cli`). Such a command takes `--server` as every command
that talks to a Perito server does: `@server_option()` above it.
"""

from __future__ import annotations

from perito._cli import server_option

__all__ = ["server_option"]
