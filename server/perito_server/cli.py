"""Server-side `perito` commands, plugged into the CLI through the `perito.commands` entry point.

`perito serve` runs the gRPC service; `perito models import` / `alias` write to the registry
directly (they are operator tools, used where the registry's credentials are).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from perito_core.errors import PeritoError
from perito_core.manifest import InputContract
from perito_core.registry import ModelRegistry
from perito_server.settings import ServerSettings


def _settings(**flags: Any) -> ServerSettings:
    """Flags given on the command line win over `PERITO_*` environment variables."""
    return ServerSettings(**{k: v for k, v in flags.items() if v not in (None, ())})


def _registry(registry: str | None) -> ModelRegistry:
    return _settings(registry=registry).open_registry()


_registry_option = click.option(
    "--registry",
    envvar="PERITO_REGISTRY",
    help="Folder, file:// or s3://bucket/prefix "
    "(env PERITO_REGISTRY; S3 endpoint and keys from PERITO_S3_* or the AWS defaults).",
)


@click.command()
@click.option("--host", help="Interface to bind (env PERITO_HOST, default 127.0.0.1).")
@click.option("--port", type=int, help="Port, 0 for any free one (env PERITO_PORT, default 8500).")
@_registry_option
@click.option("--device", help="auto, cpu, cuda, cuda:1 ... (env PERITO_DEVICE).")
@click.option("--preload", multiple=True, help="NAME[@VERSION] to load before serving.")
@click.option("--max-batch-size", type=int, help="Images per forward pass (default 4).")
@click.option("--max-queue-delay-ms", type=float, help="Wait for a fuller batch (default 2).")
@click.option("--max-queue-size", type=int, help="Images admitted and waiting (default 256).")
@click.option(
    "--metrics-port", type=int, help="Prometheus /metrics port (env PERITO_METRICS_PORT; off)."
)
@click.option(
    "--tenants-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Tenants, their token digests, roles, models, storage and quotas (YAML; env "
    "PERITO_TENANTS_FILE; re-read when it changes and on SIGHUP).",
)
@click.option(
    "--insecure",
    is_flag=True,
    default=None,
    help="Allow serving without authentication on an interface other than loopback.",
)
@click.option("--log-level", default="INFO", show_default=True)
def serve(log_level: str, **flags: Any) -> None:
    """Run the gRPC service until SIGTERM or Ctrl-C.

    \b
    Example:
      perito serve --registry ./var/registry --port 8500 --preload car-damage@production
    """
    from perito_core.logs import configure_logging
    from perito_server.app import serve as run

    settings = _settings(**flags)
    configure_logging(log_level, settings.log_format)
    try:
        asyncio.run(run(settings))
    except PeritoError as error:
        raise click.ClickException(error.message) from None


def _read_labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@click.command("import")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="The model's name, e.g. car-damage.")
@click.option(
    "--labels",
    "labels_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Text file, one class label per line, in output order.",
)
@click.option(
    "--input-size",
    type=int,
    default=224,
    show_default=True,
    help="Height and width the module expects.",
)
@click.option(
    "--resize-size",
    type=int,
    help="Shorter side before the centre crop (default: input size / 0.875).",
)
@click.option(
    "--resize-mode",
    type=click.Choice(["center_crop", "squash"]),
    default="center_crop",
    show_default=True,
)
@click.option(
    "--interpolation",
    type=click.Choice(["nearest", "bilinear", "bicubic"]),
    default="bilinear",
    show_default=True,
)
@click.option("--description", default="", help="Free text for the model card.")
@click.option(
    "--confidence-threshold",
    type=click.FloatRange(0, 1),
    help="Recommended top-1 probability below which predictions are uncertain.",
)
@click.option("--alias", "aliases", multiple=True, help="Point this alias at the new version.")
@_registry_option
def import_model(
    model_file: Path,
    name: str,
    labels_file: Path,
    input_size: int,
    resize_size: int | None,
    resize_mode: str,
    interpolation: str,
    description: str,
    confidence_threshold: float | None,
    aliases: tuple[str, ...],
    registry: str | None,
) -> None:
    """Publish a TorchScript file and its labels as the next version of a model.

    The module must take a uint8 RGB batch (N, 3, H, W) and return probabilities (N, classes),
    normalising inside. It is loaded and run once before anything is written.

    \b
    Example:
      perito models import model.pt --name car-damage --labels labels.txt --alias staging
    """
    labels = _read_labels(labels_file)
    target = _registry(registry)
    try:
        contract = InputContract(
            height=input_size,
            width=input_size,
            resize_size=resize_size or round(input_size / 0.875),
            resize_mode=resize_mode,
            interpolation=interpolation,
        )
        _check_loads(model_file, name, labels, contract)
        manifest = target.publish(
            name,
            model_file,
            labels=labels,
            input=contract,
            description=description,
            confidence_threshold=confidence_threshold,
            source={"imported_from": model_file.name},
            aliases=aliases,
        )
    except PeritoError as error:
        raise click.ClickException(error.message) from None
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise click.ClickException(f"cannot import {model_file}: {problems}") from None
    alias_note = f" (aliases: {', '.join(aliases)})" if aliases else ""
    click.echo(f"published {manifest.name}@{manifest.version} to {target.description}{alias_note}")


def _check_loads(model_file: Path, name: str, labels: list[str], contract: InputContract) -> None:
    """Load and run the module against a draft manifest, so a bad file is never published."""
    from perito_core.manifest import Artifact, ModelManifest, sha256_file
    from perito_core.runtime import LoadedModel  # imports torch: only when importing a model

    draft = ModelManifest(
        name=name,
        version="0",
        labels=labels,
        input=contract,
        artifact=Artifact(sha256=sha256_file(model_file), size_bytes=model_file.stat().st_size),
    )
    LoadedModel.load(model_file, draft, device="cpu", optimize=False)


@click.command("alias")
@click.argument("name")
@click.argument("alias")
@click.argument("version")
@_registry_option
def set_alias(name: str, alias: str, version: str, registry: str | None) -> None:
    """Point ALIAS of model NAME at VERSION (a number or another alias).

    \b
    Example:
      perito models alias car-damage production 4
    """
    target = _registry(registry)
    try:
        target.set_alias(name, alias, version)
        resolved = target.resolve(name, alias)
    except PeritoError as error:
        raise click.ClickException(error.message) from None
    click.echo(f"{name}@{alias} -> {resolved}")


@click.command("health")
@click.option(
    "--server",
    envvar="PERITO_SERVER",
    default="localhost:8500",
    show_default=True,
    help="host:port to check (env PERITO_SERVER).",
)
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait.")
def health(server: str, timeout: float) -> None:
    """Exit 0 when the server reports SERVING (grpc.health.v1), 1 otherwise.

    For container health checks where no gRPC probe is built in.

    \b
    Example:
      perito health --server localhost:8500
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(server) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
    except grpc.RpcError as error:
        raise click.ClickException(f"{server}: {error.code().name}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    click.echo(f"{server}: {status}")
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise SystemExit(1)


def register(cli: click.Group) -> None:
    """Entry point for `perito.commands`: add the server-side commands."""
    cli.add_command(serve)
    cli.add_command(health)
    models = cli.commands["models"]
    assert isinstance(models, click.Group)
    models.add_command(import_model)
    models.add_command(set_alias)
