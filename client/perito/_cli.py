"""The `perito` command line.

Client commands (classify, jobs, models list / show, health) live here and need only the SDK.
Server-side commands (serve, models import, ...) are plugged in through the `perito.commands`
entry point group by packages that are installed with `perito[serve]` or `perito[train]`, so
the SDK never imports them.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

import click

from perito._client import Client, JobHandle
from perito._errors import (
    PeritoError,
    UnavailableError,
)
from perito._models import (
    Classification,
    Job,
    JobItemResult,
    JobState,
    Model,
    RejectedImage,
)
from perito._progress import ProgressBar
from perito._requests import DEFAULT_TARGET
from perito.v1.vocabulary import EXIT_CODES, refusal_paragraphs

# Exit codes scripts can branch on.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INVALID_INPUT = EXIT_CODES["INVALID_ARGUMENT"]  # and 3 not found, 5 unavailable
# 128 + SIGINT, as shells report a command stopped with Ctrl-C.
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])


def server_option(
    help: str = "host:port of the Perito server (env PERITO_SERVER). TLS and auth come from the "
    "environment: PERITO_TLS=1 (system CAs) or PERITO_TLS_CA=ca.pem, PERITO_TOKEN=<token>.",
) -> Callable[[F], F]:
    """`--server` (env PERITO_SERVER, default localhost:8500), as every command that talks to
    a Perito server takes it (also `perito web`'s)."""
    return click.option(
        "--server",
        envvar="PERITO_SERVER",
        default=DEFAULT_TARGET,
        show_default=True,
        help=help,
        callback=_check_server,
    )


def _check_server(_context: click.Context, _parameter: click.Parameter, server: str) -> str:
    """`--server` as gRPC takes it: HOST:PORT (or gRPC's own `dns:`, `ipv4:`, `ipv6:`,
    `unix:` forms), never a URL: `http://host:port` reads as a host named `http`."""
    scheme, sep, rest = server.partition("://")
    if sep and scheme.lower() in ("http", "https", "grpc", "grpcs"):
        raise click.BadParameter(
            f"{server!r}: HOST:PORT, without a scheme (here {rest.rstrip('/')!r}); "
            "TLS comes from PERITO_TLS=1 or PERITO_TLS_CA"
        )
    if not sep and not server.startswith(_GRPC_SCHEMES) and not _PORT.search(server):
        # gRPC would quietly call port 443, where no Perito server listens by default.
        raise click.BadParameter(
            f"{server!r}: HOST:PORT, with the port (perito serve listens on 8500: "
            f"{server}:8500); without one gRPC would call port 443"
        )
    return server


# gRPC's own target forms, which `--server` passes as they are; and a target's `:PORT` end.
_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
_PORT = re.compile(r"(?:^|[^:]):\d+$|\]:\d+$")


def _finite_seconds(_context: click.Context, _parameter: click.Parameter, value: float) -> float:
    """`--timeout`: a finite number of seconds over zero."""
    if not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value!r}: give a number of seconds over 0")
    return value


_server_option = server_option()


def _connect(server: str, timeout: float) -> Client:
    """A client for `server`, with TLS and a bearer token when the environment asks for them
    (secrets stay out of the command line and shell history)."""
    ca = os.environ.get("PERITO_TLS_CA") or None
    tls = os.environ.get("PERITO_TLS", "").lower() in ("1", "true", "yes")
    token = os.environ.get("PERITO_TOKEN") or None
    return Client(server, timeout=timeout, tls=tls, root_certificates=ca, token=token)


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
_timeout_option = click.option(
    "--timeout",
    type=float,
    default=60.0,
    show_default=True,
    callback=_finite_seconds,
    help="Each call's deadline in seconds (waiting for a job has none: Ctrl-C stops waiting, "
    "the job goes on).",
)
_model_option = click.option(
    "--model", "-m", "model_ref", required=True, help="NAME or NAME@VERSION_OR_ALIAS."
)
_threshold_option = click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Top-1 probability under which a result is flagged uncertain.",
)


def _job_arguments(command: F) -> F:
    """`JOB_ID`, `--server` and `--timeout`: what every command on one job takes."""
    return click.argument("job_id")(_server_option(_timeout_option(command)))


class PluginsOnDemand(click.Group):
    """A group whose commands from installed extras (`perito serve`, `perito models import`,
    ...) are added only when a command is not among its own, or the commands are listed:
    the extras import torch and the server, about 2.5 s and 900 MB, which `perito health` (a
    container's health check), `perito classify` and the other SDK commands do not need."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and _load_plugins():
            command = super().get_command(ctx, cmd_name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        _load_plugins()
        return super().list_commands(ctx)


class PeritoGroup(PluginsOnDemand):
    """Turns SDK errors into one readable line and a meaningful exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PeritoError as error:
            click.echo(f"error: {error.message}", err=True)
            for violation in error.violations:
                if violation.description != error.message:
                    click.echo(f"  {violation.field}: {violation.description}", err=True)
            if isinstance(error, UnavailableError) and "failed to connect" in error.message:
                # gRPC's words for "nothing answers there": say where the address comes from.
                click.echo(
                    "  no Perito server answers there: start one (perito serve), or name "
                    "the one to call with --server HOST:PORT or PERITO_SERVER",
                    err=True,
                )
                proxy = _proxy_variable()
                if proxy:
                    click.echo(
                        f"  {proxy} is set, and gRPC sends calls through it: name the server's "
                        "host in no_proxy (or no_grpc_proxy) to call it directly",
                        err=True,
                    )
            ctx.exit(_exit_code(error))
        except ValueError as error:  # the SDK's word for an argument it cannot take
            click.echo(f"error: {error}", err=True)
            ctx.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def _proxy_variable() -> str:
    """The proxy variable gRPC would use (grpc_proxy, https_proxy, http_proxy), or ""."""
    return next(
        (name for name in ("grpc_proxy", "https_proxy", "http_proxy") if os.environ.get(name)),
        "",
    )


def _exit_code(error: PeritoError) -> int:
    return EXIT_CODES.get(error.code.name, EXIT_ERROR)


@click.group(cls=PeritoGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="perito")
def cli() -> None:
    """Perito: classify images, run bulk jobs, manage models."""


def split_model_ref(ref: str) -> tuple[str, str]:
    """`name@version_or_alias` -> (name, version_or_alias)."""
    name, _, version = ref.partition("@")
    return name, version


def _default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):  # an explanation's overlay PNG
        return base64.b64encode(value).decode()
    raise TypeError(type(value).__name__)


def _print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, default=_default))


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@_model_option
@click.option("--top-k", "-k", default=3, show_default=True, type=click.IntRange(min=1))
@_threshold_option
@click.option(
    "--explain",
    "explain_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write where the model looked for each image's top-1 class: one overlay PNG "
    "per image into this folder, named after the image (claim-1.jpg: "
    "claim-1.explanation.png). Costs 50 forward passes per image.",
)
@click.option(
    "--routing-key",
    default="",
    help="Keep these images on one version while the alias has a canary: every call with "
    "the same key (a claim id, say) is answered by the same version.",
)
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Classify the others when some images are refused (not an image, too large, ...): "
    "each refused one is printed with why, and the exit code is 4.",
)
@_server_option
@_timeout_option
@_json_option
def classify(
    images: tuple[str, ...],
    model_ref: str,
    top_k: int,
    threshold: float,
    explain_dir: Path | None,
    routing_key: str,
    skip_invalid: bool,
    server: str,
    timeout: float,
    as_json: bool,
) -> None:
    """Classify IMAGES with a model and print each one's top-k.

    \b
    Example:
      perito classify claim/*.jpg --model car-damage@production --top-k 3
      perito classify claim/*.jpg --model car-damage --explain explained/
      perito classify claim-1/*.jpg --model car-damage@production --routing-key claim-1
      perito classify site-7/*.jpg --model cracks --skip-invalid
    """
    name, version = split_model_ref(model_ref)
    with _connect(server, timeout) as client:
        outcomes = client.classify(
            [Path(p) for p in images],
            model=name,
            version=version,
            top_k=top_k,
            confidence_threshold=threshold,
            ids=[id_for_path(path) for path in images],
            explain=explain_dir is not None,
            routing_key=routing_key,
            on_invalid="skip" if skip_invalid else "fail",
        )
    results = [r for r in outcomes if isinstance(r, Classification)]
    if explain_dir is not None:
        _write_explanations(results, explain_dir)
    if as_json:
        _print_json(
            [asdict(r) if isinstance(r, Classification) else _rejected(r) for r in outcomes]
        )
    else:
        for outcome in outcomes:
            if isinstance(outcome, Classification):
                _print_classification(outcome)
            else:
                shown = _line_safe(outcome.image_id)
                click.echo(f"{shown}  rejected: {_line_safe(outcome.error.message)}")
    if len(results) < len(outcomes):
        sys.exit(EXIT_INVALID_INPUT)


def _rejected(rejected: RejectedImage) -> dict[str, object]:
    """A refused image for `--json`: its id, index, and the error's reason and message."""
    error = rejected.error
    return {
        "image_id": rejected.image_id,
        "index": rejected.index,
        "error": {"reason": error.reason, "message": error.message},
    }


# The most characters an image id may have (the API's limit: docs/api.md, `Image.id`).
MAX_IMAGE_ID_CHARS = 256


def id_for_path(path: str) -> str:
    """The id `perito classify` gives the image at `path`: the path as typed, or where that is
    over `MAX_IMAGE_ID_CHARS`, "..." and its last characters (the file name kept), so that a
    file deep in a folder tree is classified rather than refused for its id."""
    if len(path) <= MAX_IMAGE_ID_CHARS:
        return path
    return "..." + path[-(MAX_IMAGE_ID_CHARS - 3) :]


def explanation_file(folder: Path, image_id: str, taken: set[str]) -> Path:
    """Where the overlay of `image_id` goes: `folder/<its file name's stem>.explanation.png`,
    characters other than letters, digits, `.`, `-` and `_` as `_`, and `-2`, `-3`, ... after
    the stem when an earlier image of the call took the name (`taken`, updated).

    Raises:
        click.ClickException: the file would be outside `folder` (a symbolic link there).
    """
    stem = re.sub(r"[^\w.-]", "_", Path(image_id.replace("\\", "/")).stem).lstrip(".") or "image"
    name, number = f"{stem}.explanation.png", 1
    while name in taken:
        number += 1
        name = f"{stem}-{number}.explanation.png"
    taken.add(name)
    path = folder / name
    if path.is_symlink() or path.resolve().parent != folder.resolve():
        raise click.ClickException(f"refusing to write {path}: it leads outside {folder}")
    return path


def _write_explanations(results: list[Classification], folder: Path) -> None:
    """Each result's explanation overlay into `folder` (made if need be), one line each."""
    folder.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for result in results:
        if result.explanation is None:
            continue
        path = explanation_file(folder, result.image_id, taken)
        result.explanation.save(path)
        click.echo(
            f"{result.image_id}: explanation of {result.explanation.label!r} in {path}", err=True
        )


def _notes(result: Classification, uncertain: str) -> str:
    """What a person acting on `result` must know beside its classes, each in brackets: the
    model is unsure (`uncertain`), the photo failed the quality gate (its issues, as
    `Quality.issues`: BLURRY, UNDEREXPOSED, ...), only an animation's first frame was
    classified. "" when there is nothing to say."""
    notes = [uncertain] if result.uncertain else []
    if result.quality is not None and result.quality.issues:
        notes.append("poor photo: " + ", ".join(result.quality.issues))
    if result.first_frame_only:
        notes.append("first frame only")
    return "".join(f"  [{note}]" for note in notes)


def _line_safe(text: str) -> str:
    """`text` for one line of a terminal: a control character (a newline in a file name
    could fake a line of output) written as its escape, `\\n`."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _print_classification(result: Classification) -> None:
    flag = _notes(result, "uncertain: review by a person")
    shown = _line_safe(result.image_id)
    click.echo(f"{shown}  ({result.model}@{result.model_version}){flag}")
    width = max(len(p.label) for p in result.predictions)
    for rank, prediction in enumerate(result.predictions, start=1):
        click.echo(f"  {rank}. {prediction.label:<{width}}  {prediction.probability:7.2%}")


@cli.group(cls=PluginsOnDemand)
def models() -> None:
    """List and inspect models (and, with perito[serve], import them)."""


@models.command("list")
@_server_option
@_timeout_option
@_json_option
def models_list(server: str, timeout: float, as_json: bool) -> None:
    """List the registry's models, their latest versions and aliases.

    \b
    Example:
      perito models list --json
    """
    with _connect(server, timeout) as client:
        found = client.list_models()
    if as_json:
        _print_json([asdict(m) for m in found])
        return
    if not found:
        click.echo("no models")
        return
    click.echo(f"{'MODEL':<32} {'LATEST':>6}  {'VERSIONS':>8}  ALIASES")
    for model in found:
        aliases = ", ".join(f"{a}->{v}" for a, v in sorted(model.aliases.items()))
        click.echo(
            f"{model.name:<32} {model.latest_version:>6}  {len(model.versions):>8}  {aliases}"
        )


@models.command("show")
@click.argument("name")
@_server_option
@_timeout_option
@_json_option
def models_show(name: str, server: str, timeout: float, as_json: bool) -> None:
    """Show a model's versions and the latest version's model card.

    \b
    Example:
      perito models show imagenet-efficientnet-lite0
    """
    with _connect(server, timeout) as client:
        model = client.get_model(name)
    if as_json:
        _print_json(asdict(model))
        return
    _print_model(model)


def _print_model(model: Model) -> None:
    click.echo(
        f"model {model.name}: {len(model.versions)} version(s), latest {model.latest_version}"
    )
    for version in model.versions:
        aliases = f" [{', '.join(version.aliases)}]" if version.aliases else ""
        loaded = " (loaded)" if version.loaded else ""
        created = version.created.isoformat(timespec="seconds") if version.created else "?"
        click.echo(
            f"  v{version.version}{aliases}{loaded}  {created}  {len(version.labels)} classes  "
            f"input {version.input_height}x{version.input_width}  sha256 {version.sha256[:12]}"
        )
        if version.load_error:
            click.echo(f"    NOT SERVING: {version.load_error}")
    for alias, rollout in sorted(model.rollouts.items()):
        parts = [f"{alias} -> v{model.aliases.get(alias, '?')}"]
        if rollout.canary_version:
            parts.append(f"canary v{rollout.canary_version} at {rollout.canary_percent:g}%")
        if rollout.shadow_version:
            parts.append(f"shadow v{rollout.shadow_version} on {rollout.shadow_sample:.0%}")
        click.echo(f"  rollout {', '.join(parts)}")
    latest = model.versions[-1]
    if latest.description:
        click.echo(f"\n{latest.description}")
    labels = latest.labels
    shown = " | ".join(labels[:10]) + (f", ... ({len(labels)} in all)" if len(labels) > 10 else "")
    click.echo(f"\nlabels: {shown}")
    tensor = latest.card.get("tensor")
    if isinstance(tensor, dict):  # an imported ONNX model: how its graph is fed and read
        # The graph output served; none recorded before imports named it (the graph's only one).
        served = f" (graph output {tensor['output_name']})" if tensor.get("output_name") else ""
        click.echo(
            f"onnx input: {tensor.get('layout')} {tensor.get('dtype')} "
            f"{tensor.get('channel_order')}, (pixel x {float(tensor.get('scale', 0)):.6g} - mean "
            f"{tensor.get('mean')}) / std {tensor.get('std')}; output: {tensor.get('output')}"
            f"{served}"
        )
    metrics = latest.card.get("metrics") or {}
    if metrics:
        click.echo("metrics:")
        for key, value in sorted(metrics.items()):
            if isinstance(value, float):
                click.echo(f"  {key}: {value:.4g}")  # 0.09437234918276471 as 0.09437
            elif not isinstance(value, dict | list):
                click.echo(f"  {key}: {value}")
    _print_forms(latest.card)


def _print_forms(card: dict[str, Any]) -> None:
    """The card's compiled forms with the accuracy gate's evidence (held-out images, the 95%
    lower bound of the agreement, the accuracy change's 95% interval, a weak gate's warning),
    and why the others were not built. Cards from before the bounds print without them."""
    forms, skipped = card.get("forms") or [], card.get("skipped_forms") or {}
    if forms or skipped:
        click.echo("compiled forms (gated against model.pt):")
    for form in forms:
        line = (
            f"  {form['name']}: top-1 agreement {form['agreement']:.2%} on {form['images']} images"
        )
        if form.get("agreement_lower") is not None:
            line += f" (95% lower bound {form['agreement_lower']:.2%})"
        if form.get("accuracy") is not None and form.get("reference_accuracy") is not None:
            change = 100 * (form["accuracy"] - form["reference_accuracy"])
            line += f", accuracy change {change:+.2f} points"
            if form.get("accuracy_change_lower") is not None:
                line += (
                    f" (95% interval {100 * form['accuracy_change_lower']:+.2f} to "
                    f"{100 * form['accuracy_change_upper']:+.2f})"
                )
        click.echo(line)
        if form.get("gate_warning"):
            click.echo(f"    {form['gate_warning']}")
    for name, reason in skipped.items():
        click.echo(f"  {name}: not built:")
        for paragraph in refusal_paragraphs(reason):
            click.echo(paragraph)


def _job_line(job: Job) -> str:
    line = (
        f"job {job.id}  {job.state.value}  {job.model}@{job.model_version}  "
        f"{job.done}/{job.total} done: {job.succeeded} succeeded, {job.failed} failed"
    )
    if job.cancelled:
        line += f", {job.cancelled} cancelled"
    if job.error:
        line += f"\n  error: {job.error}"
    for uri in job.result_uris:
        line += f"\n  results: {uri}"
    if job.terminal and job.done and not job.result_uris and not job.error:
        # Written where the server keeps them, which this caller is not told.
        line += f"\n  results: perito job results {job.id}"
    return line


def _print_job(job: Job, as_json: bool) -> None:
    click.echo(json.dumps(asdict(job), default=_default, indent=2) if as_json else _job_line(job))


def _follow(handle: JobHandle, as_json: bool) -> Job:
    """Watch the job to its end (a progress bar unless `as_json`); on Ctrl-C, say that the
    job goes on and how to follow or stop it."""
    bar = None if as_json else ProgressBar()
    job = handle.last
    started, hinted = time.monotonic(), False
    try:
        for job in handle.watch():
            if bar is not None:
                bar.update(job)
            hint = None if hinted else queued_hint(job, time.monotonic() - started)
            if hint:
                click.echo(f"\n{hint}", err=True)
                hinted = True
    except KeyboardInterrupt:
        click.echo(
            f"\nstopped waiting; job {handle.id} goes on: perito job watch {handle.id}, or "
            f"perito job cancel {handle.id}",
            err=True,
        )
        raise
    return job


# How long a job may stay queued before `--wait` says why it might be.
QUEUED_HINT_S = 30.0


def queued_hint(job: Job, waited_s: float) -> str | None:
    """What to tell someone waiting on `job` that is still queued after `QUEUED_HINT_S`
    seconds (no worker took any of it), or None."""
    if job.state is not JobState.QUEUED or waited_s < QUEUED_HINT_S:
        return None
    return (
        f"job {job.id} is still queued after {waited_s:.0f} s: no worker has started it. Are "
        "workers running (perito worker) on this server's Redis, or busy with other jobs?"
    )


def _parse_labels(
    _context: click.Context, _parameter: click.Parameter, given: tuple[str, ...]
) -> dict[str, str]:
    """`("site=garage-7", "floor=2")` -> `{"site": "garage-7", "floor": "2"}`; click.BadParameter
    for one without `=` or a key."""
    labels: dict[str, str] = {}
    for label in given:
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{label!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def _label_option(description: str) -> Callable[[F], F]:
    """`--label KEY=VALUE` (repeatable), received as a dict."""
    return click.option(
        "--label",
        "labels",
        multiple=True,
        metavar="KEY=VALUE",
        callback=_parse_labels,
        help=description,
    )


@cli.command()
@click.argument("source")
@_model_option
@click.option(
    "--output", "output_uri", default="", help="s3://bucket/prefix/ or a folder for results."
)
@click.option("--top-k", "-k", default=5, show_default=True, type=click.IntRange(min=1))
@_threshold_option
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images per unit of work (default: the server's).",
)
@click.option("--inline", is_flag=True, help="Send a local folder's images in the request.")
@click.option(
    "--upload-to",
    help="Upload a local folder's images to this s3://bucket/prefix/ first (needs boto3; "
    "endpoint and keys from the AWS settings, e.g. AWS_ENDPOINT_URL_S3).",
)
@click.option(
    "--wait", "wait_", is_flag=True, help="Follow the job with a progress bar until done."
)
@_label_option("A label for the job, to find it by (`perito job list --label`; repeatable).")
@_server_option
@_timeout_option
@_json_option
def submit(
    source: str,
    model_ref: str,
    output_uri: str,
    top_k: int,
    threshold: float,
    chunk_size: int | None,
    inline: bool,
    upload_to: str | None,
    wait_: bool,
    labels: dict[str, str],
    server: str,
    timeout: float,
    as_json: bool,
) -> None:
    """Submit SOURCE as a bulk job: an s3:// prefix, a manifest (.csv / .jsonl) or a folder.

    \b
    Examples:
      perito submit s3://inspections/garage-7/ --model cracks@production --wait
      perito submit photos.csv --model cracks --output s3://results/garage-7/
      perito submit ./photos --model cracks --inline --wait --json
      perito submit ./photos --model cracks --upload-to s3://inspections/site-9/ --wait
      perito submit ./photos --model cracks --label site=garage-7 --label floor=2
    """
    name, version = split_model_ref(model_ref)
    with _connect(server, timeout) as client:
        handle = client.submit_job(
            source,
            model=name,
            version=version,
            output_uri=output_uri,
            top_k=top_k,
            confidence_threshold=threshold,
            chunk_size=chunk_size or 0,
            inline=inline,
            upload_to=upload_to,
            labels=labels,
        )
        if not as_json:
            click.echo(f"submitted job {handle.id}: {handle.last.total} images", err=True)
        job = _follow(handle, as_json) if wait_ else handle.last
    if as_json:
        _print_json(asdict(job))
    else:
        click.echo(_job_line(job))
    if wait_ and job.state is JobState.FAILED:
        sys.exit(EXIT_ERROR)


@cli.group()
def job() -> None:
    """Follow, read and cancel bulk jobs."""


@job.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([state.value for state in JobState]),
    help="Only jobs in this state (repeatable).",
)
@_label_option("Only jobs with this label (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@_server_option
@_timeout_option
@_json_option
def job_list(
    states: tuple[str, ...],
    labels: dict[str, str],
    limit: int,
    server: str,
    timeout: float,
    as_json: bool,
) -> None:
    """List your jobs (your tenant's), newest first.

    \b
    Example:
      perito job list --state running --label site=garage-7
    """
    with _connect(server, timeout) as client:
        for count, found in enumerate(
            client.list_jobs(states=states, labels=labels, page_size=min(limit, 1000)), start=1
        ):
            click.echo(json.dumps(asdict(found), default=_default) if as_json else _job_line(found))
            if count >= limit:
                break


def _job_call(name: str, summary: str, call: Callable[[Client, str], Job]) -> None:
    """Add `perito job NAME JOB_ID [--json]`: `call` the server, print the job it answers."""

    @job.command(name, help=f"{summary}\n\n\b\nExample:\n  perito job {name} 3f1c9e0a7b2d4c6e8f10")
    @_job_arguments
    @_json_option
    def command(job_id: str, server: str, timeout: float, as_json: bool) -> None:
        with _connect(server, timeout) as client:
            _print_job(call(client, job_id), as_json)


_job_call("status", "Show a job's state and counts.", Client.get_job)
_job_call(
    "cancel", "Cancel a job: images not classified yet are marked cancelled.", Client.cancel_job
)


@job.command("watch")
@_job_arguments
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON line per snapshot instead of a bar."
)
def job_watch(job_id: str, server: str, timeout: float, as_json: bool) -> None:
    """Follow a job with a progress bar until it is done.

    \b
    Example:
      perito job watch 3f1c9e0a7b2d4c6e8f10
      perito job watch 3f1c9e0a7b2d4c6e8f10 --json | jq .succeeded
    """
    with _connect(server, timeout) as client:
        handle = client.job(job_id)
        if as_json:
            for snapshot in handle.watch():
                click.echo(json.dumps(asdict(snapshot), default=_default))
            return
        click.echo(_job_line(_follow(handle, as_json=False)))


@job.command("results")
@click.argument("job_id")
@click.option("--failed", is_flag=True, help="Only the items that failed.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many rows.")
@_server_option
@_timeout_option
@_json_option
def job_results(
    job_id: str, failed: bool, limit: int | None, server: str, timeout: float, as_json: bool
) -> None:
    """Print a job's per-image results in input order (JSON lines with --json).

    \b
    Example:
      perito job results 3f1c9e0a7b2d4c6e8f10 --failed
    """
    with _connect(server, timeout) as client:
        for count, item in enumerate(client.job(job_id).results(failed_only=failed)):
            if limit is not None and count >= limit:
                break
            if as_json:
                click.echo(json.dumps(asdict(item), default=_default))
                continue
            if count == 0:
                click.echo(f"{'INDEX':>6}  IMAGE  ANSWER")
            click.echo(_result_row(item))


def _result_row(item: JobItemResult) -> str:
    """One line of `perito job results`: the item's index (from 0, in input order), its image
    id, then the top class and its probability with `_notes`, or its state and error."""
    shown = _line_safe(item.image_id)
    if item.classification is None:
        error = _line_safe(item.error)
        return f"{item.index:>6}  {shown}  {item.state.value.upper()}  {error}"
    top, notes = item.classification.top, _notes(item.classification, "uncertain")
    return f"{item.index:>6}  {shown}  {top.label}  {top.probability:.2%}{notes}"


@job.command("delete")
@_job_arguments
def job_delete(job_id: str, server: str, timeout: float) -> None:
    """Delete a job's record and results from the server now (a running job is cancelled
    first). Results files already written stay. Jobs are deleted by themselves after the
    server's retention (PERITO_JOB_RETENTION, default 7 days).

    \b
    Example:
      perito job delete 3f1c9e0a7b2d4c6e8f10
    """
    with _connect(server, timeout) as client:
        client.delete_job(job_id)
    click.echo(f"deleted job {job_id}")


@cli.command()
@server_option("host:port to check (env PERITO_SERVER): the API port or the health port.")
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait.")
def health(server: str, timeout: float) -> None:
    """Exit 0 when the server reports SERVING (grpc.health.v1), 1 otherwise (also when it
    does not answer: container health checks read 0 and 1 only).

    For container health checks where no gRPC probe is built in. TLS as every command takes
    it, from PERITO_TLS=1 or PERITO_TLS_CA (the health port is plaintext).

    \b
    Example:
      perito health --server localhost:8500
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ca = os.environ.get("PERITO_TLS_CA") or None
    tls = os.environ.get("PERITO_TLS", "").lower() in ("1", "true", "yes")
    try:
        with (
            grpc.secure_channel(
                server,
                grpc.ssl_channel_credentials(Path(ca).read_bytes() if ca else None),
            )
            if tls or ca
            else grpc.insecure_channel(server)
        ) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
    except grpc.RpcError as error:
        raise click.ClickException(f"{server}: {error.code().name}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    click.echo(f"{server}: {status}")
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise SystemExit(1)


_plugins_loaded = False


def _load_plugins() -> bool:
    """Add the server-side commands from installed extras, once; skip what is not installed.
    Returns whether this call added them (False: added before)."""
    global _plugins_loaded
    if _plugins_loaded:
        return False
    _plugins_loaded = True
    for entry_point in entry_points(group="perito.commands"):
        try:
            register = entry_point.load()
        except ImportError as exc:
            if os.environ.get("PERITO_DEBUG"):
                click.echo(f"plugin {entry_point.name} not loaded: {exc}", err=True)
            continue
        register(cli)
    return True


def main() -> None:
    # A command's log records of WARNING and above, as bare lines on stderr (what Python shows
    # when nothing is set up), whichever library logs first; `perito serve` and `perito worker`
    # set up their own (perito_core.logs.configure_logging).
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.exit(cli.main(standalone_mode=True))


if __name__ == "__main__":
    main()
