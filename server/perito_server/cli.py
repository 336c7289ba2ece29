"""Server-side `perito` commands, plugged into the CLI through the `perito.commands` entry point.

`perito serve` runs the gRPC service; `perito models import` / `alias` write to the registry
directly (they are operator tools, used where the registry's credentials are) as the tenant
holding PERITO_TOKEN, which needs the `models:publish` role; `perito tenants add` issues
tokens; `perito audit` reads the audit log (role `admin`).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError

from perito.v1.vocabulary import EXIT_CODES
from perito_core.access.audit import record_command
from perito_core.access.tenancy import ROLES, Quotas, Tenant, add_tenant
from perito_core.cli_options import (
    alias_option,
    device_option,
    forms_option,
    load_settings,
    local_roots_option,
    metrics_port_option,
    min_agreement_option,
    precision_option,
    redis_url_option,
    registry_option,
)
from perito_core.errors import PeritoError
from perito_core.models.manifest import InputContract
from perito_core.models.registry import ModelRegistry
from perito_core.models.rollout import AliasRoute
from perito_server.oip_protocol import pixel_contract
from perito_server.onnx_import import (
    check_onnx_loads,
    contract_options,
    is_onnx,
    quality_options,
    quality_thresholds,
    tensor_contract,
)
from perito_server.settings import ServerSettings

if TYPE_CHECKING:
    from perito_core.models.card import DriftReference
    from perito_core.models.engines.base import BuiltForms, LoadedModel
    from perito_core.models.manifest import TensorContract


def _settings(**flags: Any) -> ServerSettings:
    """Flags given on the command line win over `PERITO_*` environment variables; a value
    that is not valid is a one-line error naming its variable (`load_settings`)."""
    return load_settings(ServerSettings, **flags)


def refused(
    error: PeritoError, note: str = "", *, registry: ModelRegistry | None = None
) -> click.ClickException:
    """`error` as the command's one-line error, `note` after its message, and its exit code
    by status (`perito.v1.vocabulary.EXIT_CODES`, as the SDK's commands: 3 not found, 4
    invalid input, 5 unavailable, else 1). A NOT_FOUND from `registry` (a command that reads
    it itself, not through a server) says which registry was read."""
    if registry is not None and error.code.name == "NOT_FOUND":
        note += (
            f" (in the registry at {registry.description}; --registry or PERITO_REGISTRY "
            "names another)"
        )
    exception = click.ClickException(error.message + note)
    exception.exit_code = EXIT_CODES.get(error.code.name, 1)  # type: ignore[misc]
    return exception


def _publisher(settings: ServerSettings, model: str, what: str) -> Tenant:
    """The tenant PERITO_TOKEN names, if it may publish `model`; else a CLI error."""
    try:
        return settings.acting_tenant("models:publish", what, model)
    except PeritoError as error:
        raise refused(error, " (PERITO_TOKEN)") from None


def _audit(
    settings: ServerSettings, tenant: str, method: str, resource: str, outcome: str, detail: str
) -> None:
    """The change's record in the audit log (`perito_core.access.audit.record_command`):
    nothing printed, but a line on stderr when the configured Redis cannot be reached."""
    unstored = record_command(
        settings, tenant=tenant, method=method, resource=resource, outcome=outcome, detail=detail
    )
    if unstored:
        click.echo(unstored, err=True)


@click.command()
@click.option(
    "--host",
    help="Interface of gRPC, the health port and HTTP: an IPv4 or IPv6 address (::1 or [::1]) "
    "or a name (localhost: 127.0.0.1 and ::1); beyond loopback only with tenants or --insecure "
    "(env PERITO_HOST, default 127.0.0.1).",
)
@click.option("--port", type=int, help="Port, 0 for any free one (env PERITO_PORT, default 8500).")
@registry_option
@device_option
@precision_option
@click.option("--preload", multiple=True, help="NAME[@VERSION] to load before serving.")
@local_roots_option
@redis_url_option
@click.option(
    "--max-batch-size",
    type=int,
    help="The most images per forward pass (default 8); each form runs at the size it measured.",
)
@click.option("--max-queue-delay-ms", type=float, help="Wait for a fuller batch (default 2).")
@click.option("--max-queue-size", type=int, help="Images admitted and waiting (default 256).")
@metrics_port_option
@click.option(
    "--metrics-host",
    help="Interface of /metrics (env PERITO_METRICS_HOST; default: --host's).",
)
@click.option(
    "--http-port",
    type=int,
    help="HTTP port for the Open Inference Protocol REST endpoints and the JSON API, 0 for any "
    "free one (env PERITO_HTTP_PORT; off).",
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
    """Run the gRPC service (perito.v1 and the Open Inference Protocol) until SIGTERM or
    Ctrl-C; with --http-port, the OIP REST endpoints and the JSON API too.

    \b
    Example:
      perito serve --registry ./var/registry --port 8500 --preload car-damage@production
      perito serve --registry ./var/registry --port 8500 --http-port 8000
    """
    from perito_core.logs import configure_logging
    from perito_server.app import serve as run

    settings = _settings(**flags)
    configure_logging(log_level, settings.log_format)
    try:
        asyncio.run(run(settings))
    except PeritoError as error:
        raise refused(error) from None
    except RuntimeError as error:  # refusing to start: no auth beyond loopback; ListenError
        raise click.ClickException(str(error)) from None


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
@alias_option
@forms_option("the --calibration folder's images")
@click.option(
    "--calibration",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A folder of typical images: half calibrate INT8, the other half verify every form "
    "against the TorchScript file (top-1 agreement at least --min-agreement; 200 or more "
    "held-out images, or the gate says it is weak). With subfolders calibration/ and "
    "held-out/, those are the halves.",
)
@min_agreement_option
@contract_options
@quality_options
@registry_option
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
    forms: tuple[str, ...],
    calibration: Path | None,
    min_agreement: float,
    registry: str | None,
    **contract_flags: Any,
) -> None:
    """Publish a TorchScript or ONNX file and its labels as the next version of a model.

    A TorchScript module must take a uint8 RGB batch (N, 3, H, W) and return probabilities
    (N, classes), normalising inside. An ONNX file (.onnx) is served by ONNX Runtime with the
    input contract given by --layout, --scale and the other ONNX options; a graph with several
    outputs serves the one --output-name names (refused without it), recorded in the version's
    card. Either is loaded and run once before anything is written. --min-sharpness and the
    other photo-quality options set the card's quality thresholds (docs/trust.md#quality);
    each one not given is the default.

    \b
    Example:
      perito models import model.pt --name car-damage --labels labels.txt --alias staging
      perito models import model.pt --name car-damage --labels labels.txt \\
          --forms fp32,int8 --calibration ~/photos/sample
      perito models import waste.onnx --name waste --labels labels.txt \\
          --input-size 224 --resize-mode squash --layout NHWC --scale 1/255 --output sigmoid
      perito models import parts.onnx --name parts --labels labels.txt \\
          --layout NCHW --scale 1/255 --output-name probabilities
    """
    onnx = is_onnx(model_file)
    if onnx and forms:
        raise click.BadParameter(
            "compiled forms are built from a TorchScript file; an ONNX model serves as "
            "imported, by ONNX Runtime",
            param_hint="--forms",
        )
    if forms and calibration is None:
        raise click.BadParameter(
            "compiled forms need a folder of images", param_hint="--calibration"
        )
    quality = quality_thresholds(contract_flags)
    labels = _read_labels(labels_file)
    settings = _settings(registry=registry)
    publisher = _publisher(settings, name, f"publish model {name!r}")
    target = settings.open_registry()
    try:
        contract = InputContract(
            height=input_size,
            width=input_size,
            resize_size=resize_size or round(input_size / 0.875),
            resize_mode=resize_mode,
            interpolation=interpolation,
        )
        tensor = tensor_contract(model_file, contract_flags)
        if tensor is not None:
            tensor = check_onnx_loads(model_file, name, labels, contract, tensor)
        else:
            _check_loads(model_file, name, labels, contract)
        drift = _drift_reference(model_file, name, labels, contract, tensor, calibration)
        # The forms are built in a scratch folder, removed whether or not publishing succeeds.
        with tempfile.TemporaryDirectory(prefix="perito-forms-") as scratch:
            built = _build_forms(model_file, contract, forms, calibration, min_agreement, scratch)
            manifest = target.publish(
                name,
                model_file,
                labels=labels,
                input=contract,
                description=description,
                confidence_threshold=confidence_threshold,
                source={"imported_from": model_file.name, "published_by": publisher.name},
                quality=quality,
                drift=drift,
                aliases=aliases,
                forms=built.forms if built else (),
                skipped_forms=built.skipped if built else None,
                artifact_format="onnx" if tensor is not None else "torchscript",
                tensor=tensor,
            )
    except PeritoError as error:
        _audit(settings, publisher.name, "models.import", f"models/{name}", error.code.name, "")
        raise refused(error) from None
    except ValidationError as error:
        problems = []
        for problem in error.errors():
            where = ".".join(map(str, problem["loc"]))  # empty for a whole-manifest rule
            message = str(problem["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise click.ClickException(f"cannot import {model_file}: {'; '.join(problems)}") from None
    alias_note = f" (aliases: {', '.join(aliases)})" if aliases else ""
    _audit(
        settings,
        publisher.name,
        "models.import",
        f"models/{name}/versions/{manifest.version}",
        "OK",
        f"aliases: {', '.join(aliases)}" if aliases else "",
    )
    click.echo(f"published {manifest.name}@{manifest.version} to {target.description}{alias_note}")


def _build_forms(
    model_file: Path,
    contract: InputContract,
    precisions: tuple[str, ...],
    calibration: Path | None,
    min_agreement: float,
    scratch: str,
) -> BuiltForms | None:
    """Compiled forms of an imported file, gated on the user's images, built in `scratch`;
    None when not asked."""
    from perito_core.logs import building_forms_quietly
    from perito_core.models.gate import build_forms_from_folder

    if not precisions or calibration is None:
        return None
    out = Path(scratch)
    with building_forms_quietly():  # torch's TorchScript deprecation and CUDA probe notices
        built = build_forms_from_folder(
            model_file,
            contract,
            out,
            calibration,
            precisions=precisions,
            min_agreement=min_agreement,
        )
    for line in built.summary():
        click.echo(line)
    return built


def _drift_reference(
    model_file: Path,
    name: str,
    labels: list[str],
    contract: InputContract,
    tensor: TensorContract | None,
    folder: Path | None,
) -> DriftReference | None:
    """The card's drift reference from the --calibration folder's images, run through the
    imported model (docs/monitoring.md#drift); None, said why, when it cannot be made."""
    if folder is None:
        return None
    from perito_core.drift import reference_from_folder
    from perito_core.models.manifest import ARTIFACT_FILES, Artifact, ModelManifest, sha256_file

    kind = "onnx" if tensor is not None else "torchscript"
    draft = ModelManifest(
        name=name,
        version="0",
        labels=labels,
        input=contract,
        artifact=Artifact(
            file=ARTIFACT_FILES[kind],
            format=kind,
            sha256=sha256_file(model_file),
            size_bytes=model_file.stat().st_size,
        ),
        tensor=tensor,
    )
    model: LoadedModel
    if tensor is not None:
        from perito_core.models.engines.onnxruntime import OnnxModel

        model = OnnxModel.open(model_file, draft)
    else:
        from perito_core.models.engines.torchscript import TorchScriptModel

        model = TorchScriptModel.load(model_file, draft, device="cpu", optimize=False)
    reference, said = reference_from_folder(model.predict, labels, contract.spec(), folder)
    click.echo(f"drift reference: {said}" if reference else f"no drift reference: {said}")
    return reference


def _check_loads(model_file: Path, name: str, labels: list[str], contract: InputContract) -> None:
    """Load and run the module against a draft manifest, so a bad file is never published."""
    from perito_core.models.engines.torchscript import TorchScriptModel  # imports torch: only here
    from perito_core.models.manifest import Artifact, ModelManifest, sha256_file

    draft = ModelManifest(
        name=name,
        version="0",
        labels=labels,
        input=contract,
        artifact=Artifact(sha256=sha256_file(model_file), size_bytes=model_file.stat().st_size),
    )
    TorchScriptModel.load(model_file, draft, device="cpu", optimize=False)


def _within(
    value: float | None, option: str, low: float, high: float, *, top_in: bool
) -> float | None:
    """`value` when it is above `low` and below `high` (or at it, with `top_in`); else a
    usage error (exit 2) naming `option`. NaN is outside every range."""
    if value is None:
        return None
    if not (low < value < high or (top_in and value == high)):
        bound = "at most" if top_in else "below"
        raise click.BadParameter(f"{value!r}: give a number above {low:g} and {bound} {high:g}")
    return value


def describe_route(name: str, alias: str, route: AliasRoute) -> str:
    """`car-damage@production -> 3, canary 4 at 5%, shadow 4 on 20% of requests`: what the
    `alias` and `shadow` commands print."""
    parts = [f"{name}@{alias} -> {route.version}"]
    if route.canary is not None:
        parts.append(f"canary {route.canary.version} at {route.canary.percent:g}%")
    if route.shadow is not None:
        shown = route.shadow.sample * 100
        parts.append(f"shadow {route.shadow.version} on {shown:g}% of requests")
    return ", ".join(parts)


@click.command("alias")
@click.argument("name")
@click.argument("alias")
@click.argument("version", required=False)
@click.option(
    "--canary",
    type=float,
    callback=lambda _c, _p, value: _within(value, "--canary", 0.0, 100.0, top_in=False),
    metavar="PERCENT",
    help="Split the alias: it keeps its version and PERCENT (above 0, below 100) of its "
    "requests go to VERSION.",
)
@click.option("--promote", is_flag=True, help="Move the alias to its canary's version.")
@click.option(
    "--rollback", is_flag=True, help="End the canary: every request to the alias's version."
)
@registry_option
def set_alias(
    name: str,
    alias: str,
    version: str | None,
    canary: float | None,
    promote: bool,
    rollback: bool,
    registry: str | None,
) -> None:
    """Point ALIAS of model NAME at VERSION (a number or another alias), or split it.

    A move ends the alias's canary. With --canary, ALIAS keeps its version and PERCENT of
    its requests go to VERSION (the same version for every request with one routing key);
    --promote moves ALIAS to the canary's version, --rollback ends the canary. Servers follow
    within their alias refresh (PERITO_ALIAS_TTL_S); each change is in the audit log.

    \b
    Example:
      perito models alias car-damage production 4
      perito models alias car-damage production 5 --canary 5
      perito models alias car-damage production --promote
    """
    ending = promote or rollback
    if promote and rollback:
        raise click.UsageError("--promote and --rollback: give one")
    if ending and (version is not None or canary is not None):
        raise click.UsageError("--promote and --rollback take no VERSION nor --canary")
    if not ending and version is None:
        raise click.UsageError("give VERSION, or --promote or --rollback")
    settings = _settings(registry=registry)
    publisher = _publisher(settings, name, f"move aliases of model {name!r}")
    target = settings.open_registry()
    resource = f"models/{name}/aliases/{alias}"
    method = "models.alias"
    if canary is not None:
        method = "models.alias.canary"
    elif ending:
        method = "models.alias.promote" if promote else "models.alias.rollback"
    try:
        before = target.aliases(name).get(alias, "")
        previous = target.route(name, alias) if before else None
        if version is not None:
            # The servers would refuse a version whose file is damaged and keep the old one
            # answering, while the alias said otherwise: checked here, before it moves.
            target.check_stored(name, target.resolve(name, str(version)))
        old = None
        if ending or canary is not None:
            target.resolve(name, alias)  # a missing alias refused in the registry's words
            old = target.route(name, alias)
        if promote:
            route = target.promote_canary(name, alias)
        elif rollback:
            route = target.rollback_canary(name, alias)
        elif canary is not None:
            route = target.set_canary(name, alias, str(version), canary)
        else:
            target.set_alias(name, alias, str(version))
            route = target.route(name, alias)
    except PeritoError as error:
        _audit(settings, publisher.name, method, resource, error.code.name, "")
        raise refused(error, registry=target) from None
    if old is None:
        detail = f"{before or '-'} -> {route.version}"
        shown = describe_route(name, alias, route)  # a shadow it keeps is said
    else:
        detail = f"{describe_route(name, alias, old)} => {describe_route(name, alias, route)}"
        shown = describe_route(name, alias, route)
    _audit(settings, publisher.name, method, resource, "OK", detail)
    click.echo(shown)
    for ended in _ended(previous, route, promote or rollback):
        click.echo(ended)
    if canary is not None and route.canary is not None:
        _warn_pixels_differ(target, name, route.version, route.canary.version)


def _ended(previous: AliasRoute | None, route: AliasRoute, ending: bool) -> list[str]:
    """What a move of an alias ended without being asked to (`--promote` and `--rollback`
    say so themselves): its canary, or its shadow now that the alias serves that version."""
    if previous is None:
        return []
    said = []
    if previous.canary is not None and route.canary is None and not ending:
        said.append(
            f"canary {previous.canary.version} at {previous.canary.percent:g}% ended: "
            "a move ends the alias's canary"
        )
    if previous.shadow is not None and route.shadow is None:
        said.append(f"shadow {previous.shadow.version} ended: the alias serves that version now")
    return said


def _warn_pixels_differ(registry: ModelRegistry, name: str, version: str, canary: str) -> None:
    """Warn (stderr) when canary `canary` takes pixels or answers labels unlike `version`:
    OIP callers sending pixels then stay on `version` (`oip_protocol.pixel_contract`)."""
    try:
        ours, theirs = (pixel_contract(registry.manifest(name, v)) for v in (version, canary))
    except PeritoError:
        return
    if ours != theirs:
        click.echo(
            f"warning: v{canary} takes {theirs[0]}x{theirs[1]} px and answers {theirs[2]} "
            f"labels, v{version} {ours[0]}x{ours[1]} px and {ours[2]} labels: OIP requests "
            f"sending pixels (shaped by the alias's metadata) all stay on v{version}; only "
            "encoded images are split",
            err=True,
        )


@click.command("shadow")
@click.argument("name")
@click.argument("candidate", required=False)
@click.option("--of", "alias", required=True, help="The alias whose traffic is shadowed.")
@click.option(
    "--sample",
    type=float,
    default=1.0,
    show_default=True,
    callback=lambda _c, _p, value: _within(value, "--sample", 0.0, 1.0, top_in=True),
    help="The share of the alias's requests also run on CANDIDATE (0 < sample <= 1).",
)
@click.option("--stop", is_flag=True, help="Stop shadowing the alias.")
@registry_option
def shadow(
    name: str, candidate: str | None, alias: str, sample: float, stop: bool, registry: str | None
) -> None:
    """Run version CANDIDATE of model NAME (a number or an alias) on a sample of the traffic
    ALIAS answers, after answering it: its answers are compared with the alias's (perito
    models compare NAME ALIAS CANDIDATE), never returned. Every server follows within one
    alias refresh (PERITO_ALIAS_TTL_S).

    \b
    Example:
      perito models shadow car-damage 4 --of production --sample 0.2
      perito models shadow car-damage --of production --stop
    """
    if stop == (candidate is not None):
        raise click.UsageError("give either CANDIDATE or --stop")
    settings = _settings(registry=registry)
    publisher = _publisher(settings, name, f"shadow aliases of model {name!r}")
    target = settings.open_registry()
    resource = f"models/{name}/aliases/{alias}"
    try:
        if candidate is None:
            route = target.stop_shadow(name, alias)
            detail = "shadow stopped"
        else:
            route = target.set_shadow(name, alias, candidate, sample)
            assert route.shadow is not None
            detail = f"shadow {route.shadow.version} sample {route.shadow.sample:g}"
    except PeritoError as error:
        _audit(settings, publisher.name, "models.shadow", resource, error.code.name, "")
        raise refused(error, registry=target) from None
    _audit(settings, publisher.name, "models.shadow", resource, "OK", detail)
    click.echo(describe_route(name, alias, route))


@click.command("compare")
@click.argument("name")
@click.argument("incumbent", required=False)
@click.argument("candidate", required=False)
@click.option(
    "--images",
    help="A folder or s3:// prefix: compare offline, one bulk job per version over its images.",
)
@click.option("--json", "as_json", is_flag=True, help="The comparison as one JSON object.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write the confusion matrix as a heat map to this PNG file.",
)
@registry_option
@local_roots_option
@redis_url_option
def compare(
    name: str,
    incumbent: str | None,
    candidate: str | None,
    images: str | None,
    as_json: bool,
    plot: Path | None,
    registry: str | None,
    local_roots: tuple[Path, ...],
    redis_url: str | None,
) -> None:
    """How version CANDIDATE of model NAME answers the images version INCUMBENT answers
    (each a number or an alias): top-1 agreement with its 95% interval, the confidence
    shift, the confusion. Live, from a shadow's counts summed over every server (role
    `models:read`); with --images, offline through two bulk jobs run by `perito worker`s
    (role `jobs`). Without INCUMBENT and CANDIDATE, the version pairs a shadow recorded.
    Needs the server's Redis (--redis-url or PERITO_REDIS_URL), PERITO_TOKEN when tenants
    are configured, and for a local folder the --local-root the server and workers were given
    (this command submits the jobs itself).

    \b
    Example:
      perito models compare car-damage production 4 --plot confusion.png
      perito models compare car-damage 3 4 --images s3://acme-claims/2024-06/
      perito models compare car-damage 3 4 --images /data/claims/june --local-root /data
    """
    from perito_server.compare import run_compare

    settings = _settings(
        registry=registry, local_roots=list(local_roots) or None, redis_url=redis_url
    )
    run_compare(settings, name, incumbent, candidate, images, as_json, plot)


@click.group()
def tenants() -> None:
    """Issue tokens and list the tenants of a tenants file."""


_tenants_file_option = click.option(
    "--tenants-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="PERITO_TENANTS_FILE",
    required=True,
    help="The tenants file (env PERITO_TENANTS_FILE).",
)


@tenants.command("add")
@click.argument("name")
@click.option(
    "--role", "roles", multiple=True, type=click.Choice(ROLES), help="A role (repeatable)."
)
@click.option("--model", "models", multiple=True, help="A model name or glob (repeatable).")
@click.option("--read", "read", multiple=True, help="s3://bucket/prefix/ or a folder it may read.")
@click.option(
    "--write", "write", multiple=True, help="s3://bucket/prefix/ or a folder it may write."
)
@click.option("--concurrent-jobs", type=click.IntRange(min=1), help="Quota: jobs at once.")
@click.option("--images-per-minute", type=click.IntRange(min=1), help="Quota: Classify images.")
@click.option("--items-per-job", type=click.IntRange(min=1), help="Quota: images in one job.")
@_tenants_file_option
def tenants_add(
    name: str,
    roles: tuple[str, ...],
    models: tuple[str, ...],
    read: tuple[str, ...],
    write: tuple[str, ...],
    concurrent_jobs: int | None,
    images_per_minute: int | None,
    items_per_job: int | None,
    tenants_file: Path,
) -> None:
    """Give tenant NAME a new token (creating the tenant), print the token once, and store
    only its sha256 digest. A running server picks the change up within a second.

    An existing tenant keeps its other tokens (rotate: add a token, move callers to it,
    then delete the old digest from the file); roles, models, prefixes and quotas given
    here replace its own.

    
    Example:
      perito tenants add acme --tenants-file tenants.yaml --role classify --role jobs \\
          --role models:read --model 'car-*' --read s3://acme-inbox/ \\
          --write s3://results/acme/ --concurrent-jobs 10 --images-per-minute 600
    """
    quotas = None
    if concurrent_jobs or images_per_minute or items_per_job:
        quotas = Quotas(concurrent_jobs, images_per_minute, items_per_job)
    try:
        token = add_tenant(
            tenants_file,
            name,
            roles=roles,
            models=models,
            read=read,
            write=write,
            quotas=quotas,
        )
    except PeritoError as error:
        raise refused(error) from None
    settings = _settings(tenants_file=tenants_file)
    _audit(settings, "", "tenants.add", f"tenants/{name}", "OK", f"roles: {', '.join(roles)}")
    click.echo(f"tenant {name!r}: new token (shown once, stored as its sha256 digest):", err=True)
    click.echo(token)


@tenants.command("list")
@_tenants_file_option
def tenants_list(tenants_file: Path) -> None:
    """Name, roles, models, storage and quotas of every tenant (never a token).

    \b
    Example:
      perito tenants list --tenants-file /etc/perito/tenants.yaml
    """
    try:
        known = _settings(tenants_file=tenants_file).open_tenants()
    except (PeritoError, OSError) as error:
        raise click.ClickException(str(error)) from None
    for name in known.names:
        tenant = known.get(name)
        assert tenant is not None
        storage = ", ".join(
            [f"read {location}" for location in tenant.read or ()]
            + [f"write {location}" for location in tenant.write or ()]
        )
        quotas = ", ".join(f"{k}={v}" for k, v in vars(tenant.quotas).items() if v is not None)
        logged = tenant.prediction_log
        click.echo(
            f"{name}: roles {', '.join(sorted(tenant.roles)) or '-'}; models "
            f"{', '.join(tenant.models) or '-'}; {storage or 'no storage'}; "
            f"{len(tenant.token_digests)} tokens"
            + (f"; quotas {quotas}" if quotas else "")
            + (f"; prediction log {logged.uri}" if logged is not None else "")
        )


@click.command("audit")
@click.option("--tenant", help="Only this tenant's records.")
@click.option("--method", help="Only this method (SubmitJob, models.alias, ...).")
@click.option("--since", type=float, help="Only records of the last SINCE hours.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit(
    tenant: str | None, method: str | None, since: float | None, limit: int, as_json: bool
) -> None:
    """The audit log, newest first: who changed what, when, and how it ended. Needs an
    `admin` token in PERITO_TOKEN (when tenants are configured) and PERITO_REDIS_URL.

    
    Example:
      perito audit --tenant acme --since 24
    """
    import time

    import redis

    settings = _settings()
    try:
        settings.acting_tenant("admin", "read the audit log")
    except PeritoError as error:
        raise refused(error, " (PERITO_TOKEN)") from None
    after = time.time() - since * 3600 if since else None
    try:
        records = settings.open_audit().list(tenant=tenant, method=method, since=after, limit=limit)
    except redis.RedisError as error:
        raise click.ClickException(f"the audit log (Redis) is unreachable: {error}") from None
    for record in records:
        if as_json:
            click.echo(record.to_json())
            continue
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.time))
        click.echo(
            f"{stamp}Z  {record.tenant or '-'}  {record.method}  {record.resource}  "
            f"{record.outcome}" + (f"  {record.detail}" if record.detail else "")
        )


@click.command("verify")
@click.argument("source")
@click.option(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="For a job's results.jsonl: the folder holding its images (by item id).",
)
@click.option("--log", "log_uri", help="For one records file: its log's prefix (default: found).")
@click.option(
    "--sample",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Answers classified again (all of them, up to this many, chosen at random).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Of the sample.")
@click.option(
    "--input-sha256",
    "digests",
    multiple=True,
    help="Only the answers for the image with this sha256 (what sha256sum prints); repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object.")
@registry_option
def verify(
    source: str,
    images: Path | None,
    log_uri: str | None,
    sample: int,
    seed: int,
    digests: tuple[str, ...],
    as_json: bool,
    registry: str | None,
) -> None:
    """Check logged answers: SOURCE is a prediction log (a folder or s3:// prefix), one of its
    records files, or a job's results.jsonl (with --images). Each image's stored bytes are
    hashed against the record, the model version's files in the registry against the
    recorded sha256s, and a sample is classified again with the recorded version and form.
    Exit status 0 when everything matches, 1 when anything does not (each mismatch listed).

    \b
    Example:
      perito verify s3://acme-logs/perito/ --registry s3://models/
      perito verify s3://acme-logs/perito/ --input-sha256 "$(sha256sum claim.jpg | cut -c1-64)"
      perito verify results.jsonl --images ./photos --json
    """
    import json

    from perito_server.verify import load_items, table
    from perito_server.verify import verify as run_checks

    settings = _settings(registry=registry)
    s3 = settings.s3_options()
    try:
        items = load_items(source, images, log_uri, s3)
        if digests:
            wanted = {digest.strip().lower() for digest in digests}
            items = [item for item in items if item.input_sha256 in wanted]
            if not items:
                raise click.ClickException(f"{source}: no answer for the sha256 given")
        run_checks(items, settings.registry, s3, sample=sample, seed=seed)
    except PeritoError as error:
        raise refused(error) from None
    ok = all(not item.problems for item in items)
    if as_json:
        report = {"ok": ok, "checked": len(items), "items": [i.as_json() for i in items]}
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(table(items))
    raise SystemExit(0 if ok else 1)


@click.command("drift")
@click.argument("name")
@click.option("--version", "ref", default="", help="A version or alias (default: the latest).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@registry_option
@click.option("--redis-url", help="The job store's Redis, which holds the live windows.")
def drift(name: str, ref: str, as_json: bool, registry: str | None, redis_url: str | None) -> None:
    """Compare a model version's live traffic with its card's reference: each signal's test
    statistic, p-value and population stability index, the window's size and a verdict
    (drift, no_drift, not_enough_images, no_reference): docs/monitoring.md#drift. Acts as
    the tenant PERITO_TOKEN names, which needs role `models:read` on the model.

    \b
    Example:
      perito models drift car-damage --version production
    """
    import json

    import redis

    from perito_core.drift import NO_REFERENCE, evaluate, read_window
    from perito_core.redis_connection import redacted, redis_client

    settings = _settings(registry=registry, redis_url=redis_url)
    try:
        settings.acting_tenant("models:read", f"read the drift of model {name!r}", name)
    except PeritoError as error:
        raise refused(error, " (PERITO_TOKEN)") from None
    target = settings.open_registry()
    try:
        version = target.resolve(name, ref)
        manifest = target.manifest(name, version)
    except PeritoError as error:
        raise refused(error, registry=target) from None
    reason = ""
    if not manifest.drift.classes:
        reason = (
            f"{name}@{version} has no drift reference: its card was published without "
            "held-out images (publish a trained run, or import with --calibration)"
        )
        rows = []
    else:
        try:
            client = redis_client(settings.redis_url, socket_connect_timeout=3)
        except PeritoError as error:
            raise refused(error) from None
        try:
            rows = read_window(client, name, version, settings.drift_window)
        except redis.RedisError as error:
            raise click.ClickException(
                f"cannot read the live window from {redacted(settings.redis_url)}: {error}"
            ) from None
        finally:
            client.close()
    report = evaluate(manifest.drift, rows)
    if as_json:
        said = {"reason": reason} if reason else {}
        click.echo(
            json.dumps({"model": name, "version": version, **report.as_dict(), **said}, indent=2)
        )
        return
    if report.verdict == NO_REFERENCE:
        click.echo(reason)
        return
    click.echo(
        f"{name}@{version}: {report.window} images in the window (of {settings.drift_window})"
    )
    if report.signals:
        click.echo(f"{'signal':<16} {'statistic':>10} {'p-value':>10} {'PSI':>8}")
        for s in report.signals:
            click.echo(f"{s.signal:<16} {s.statistic:>10.4f} {s.p_value:>10.3g} {s.psi:>8.4f}")
    else:
        click.echo(f"a verdict needs at least {report.min_window} images")
    overall = "" if report.p_value is None else f" (p = {report.p_value:.3g}, alpha {report.alpha})"
    click.echo(f"verdict: {report.verdict}{overall}")


def register(cli: click.Group) -> None:
    """Entry point for `perito.commands`: add the server-side commands."""
    cli.add_command(serve)
    cli.add_command(verify)
    cli.add_command(tenants)
    cli.add_command(audit)
    models = cli.commands["models"]
    assert isinstance(models, click.Group)
    models.add_command(import_model)
    models.add_command(set_alias)
    models.add_command(shadow)
    models.add_command(compare)
    models.add_command(drift)
