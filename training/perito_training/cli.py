"""Training-side `perito` commands, plugged in through the `perito.commands` entry point."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click


@click.command("export-pretrained")
@click.argument("architecture", type=click.Choice(["efficientnet-lite0"]))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for model.pt and labels.txt.",
)
def export_pretrained(architecture: str, out: Path) -> None:
    """Export a network with real ImageNet weights as a Perito TorchScript artifact.

    \b
    Example:
      perito export-pretrained efficientnet-lite0 --out build/lite0
      perito models import build/lite0/model.pt --labels build/lite0/labels.txt \\
          --name imagenet-efficientnet-lite0 --interpolation bicubic
    """
    from perito_training.pretrained import write_efficientnet_lite0

    model_path, labels_path = write_efficientnet_lite0(out)
    click.echo(f"wrote {model_path} and {labels_path}")


def register(cli: click.Group) -> None:
    """Entry point for `perito.commands`: only where `perito[train]` is installed."""
    if all(importlib.util.find_spec(name) for name in ("torch", "timm")):
        cli.add_command(export_pretrained)
