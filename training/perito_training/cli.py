"""Training-side `perito` commands, plugged in through the `perito.commands` entry point.

perito train RECIPE.yaml [--set KEY=VALUE ...] [--out RUN] [--publish --alias staging]
perito train --resume RUN
perito evaluate RUN [--images FOLDER]
perito publish RUN [--name NAME] [--alias ALIAS ...]
perito export-pretrained efficientnet-lite0 --out DIR
"""

from __future__ import annotations

import importlib.util
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from perito_core.cli_options import (
    alias_option,
    forms_option,
    max_accuracy_drop_option,
    min_agreement_option,
    registry_option,
)

if TYPE_CHECKING:
    from perito_core.models.manifest import InputContract, RunCard


def _fail(error: Exception) -> click.ClickException:
    return click.ClickException(str(error))


@click.command("train")
@click.argument("config_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config field by its dotted path, e.g. --set optim.lr=0.01 (repeatable).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder (default runs/NAME-YYYYmmdd-HHMMSS).",
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Continue the run in this folder from its last checkpoint (with --out: in a new "
    "folder, leaving this one as it is).",
)
@click.option("--publish", is_flag=True, help="Publish the result as a new model version.")
@click.option("--name", help="Model name to publish under (default: the config's name).")
@registry_option
@alias_option
@click.option("--progress/--no-progress", default=True, help="Progress bar per epoch.")
@forms_option("the validation split; held out: the test split; with --publish")
@min_agreement_option
@max_accuracy_drop_option
def train(
    config_file: Path | None,
    overrides: tuple[str, ...],
    out: Path | None,
    resume_dir: Path | None,
    publish: bool,
    name: str | None,
    registry: str | None,
    aliases: tuple[str, ...],
    progress: bool,
    forms: tuple[str, ...],
    min_agreement: float,
    max_accuracy_drop: float,
) -> None:
    """Train a model from a YAML config (a recipe), then evaluate, calibrate and export it.

    Everything lands in the run folder: checkpoints, history, model.pt, the model card,
    metrics, test predictions and plots. With --publish the run becomes a new model version.

    \b
    Examples:
      perito train training/recipes/fashion-mnist.yaml --out runs/fmnist
      perito train recipe.yaml --set data.root=~/photos --publish --alias staging
      perito train recipe.yaml --publish --forms fp32,int8
      perito train --resume runs/fmnist --set train.epochs=30
      perito train --resume runs/fmnist --out runs/fmnist-longer --set train.epochs=30
    """
    from perito_training.config import ConfigError, load_config
    from perito_training.datasets import DatasetError
    from perito_training.pipeline import RunError, fork_run, train_run

    if (config_file is None) == (resume_dir is None):
        raise click.UsageError("give a CONFIG_FILE to start a run, or --resume RUN to continue one")
    if forms and not publish:
        raise click.UsageError(
            "--forms builds compiled forms as the run is published: add --publish"
        )
    try:
        if resume_dir is not None:
            run_dir = resume_dir
            config = load_config(run_dir / "config.yaml", overrides)
            if out is not None:
                fork_run(resume_dir, out)
                run_dir = out
        else:
            assert config_file is not None
            config = load_config(config_file, overrides)
            stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            run_dir = out or Path("runs") / f"{config.name}-{stamp}"
        click.echo(f"run folder: {run_dir}")
        train_run(config, run_dir, resume=resume_dir is not None, log=click.echo, progress=progress)
    except (ConfigError, DatasetError, RunError, FileNotFoundError, ValueError) as error:
        raise _fail(error) from None
    click.echo(f"model card: {run_dir / 'report.md'}")
    if publish:
        _publish(
            run_dir, name, registry, aliases, None, gate=(forms, min_agreement, max_accuracy_drop)
        )


@click.command("evaluate")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--images",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="A folder of images to classify (metrics too when it has a subfolder per class).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where predictions.csv and evaluation.json go (default RUN/evaluations/FOLDER).",
)
@click.option("--show", default=10, show_default=True, help="Print this many images' top-3.")
def evaluate(run_dir: Path, images: Path | None, out: Path | None, show: int) -> None:
    """Evaluate a run's exported model: on its test split again, or on a folder of images.

    \b
    Examples:
      perito evaluate runs/car-damage                     # the card's test figures, recomputed
      perito evaluate runs/car-damage --images ~/claims/  # each image's top-3, to a CSV
    """
    from perito_training.evaluation import evaluate_folder, load_module
    from perito_training.pipeline import RunError, load_run

    try:
        config, card = load_run(run_dir)
        module = load_module(run_dir / "model.pt")
        contract = card.input
        if images is None:
            _evaluate_test_split(run_dir, config, card, module, contract)
            return
        target = out or run_dir / "evaluations" / images.resolve().name
        summary = evaluate_folder(module, card.labels, contract.spec(), images, target)
    except (RunError, FileNotFoundError, ValueError) as error:
        raise _fail(error) from None
    import csv

    with (target / "predictions.csv").open(newline="") as file:
        for row, _ in zip(csv.DictReader(file), range(show), strict=False):
            if row["error"]:
                click.echo(f"{row['image']}: unreadable: {row['error']}")
            else:
                top = ", ".join(
                    f"{row[f'class_{k}']} {float(row[f'probability_{k}']):.1%}"
                    for k in (1, 2, 3)
                    if row[f"class_{k}"]
                )
                click.echo(f"{row['image']}: {top}")
    click.echo(
        f"{summary['classified']} of {summary['images']} images classified, "
        f"{len(summary['unreadable'])} unreadable; all predictions in {summary['predictions']}"
    )
    if "metrics" in summary:
        metrics = summary["metrics"]
        click.echo(
            f"labelled by folder: accuracy {metrics['accuracy']:.4f}, "
            f"macro F1 {metrics['macro_avg']['f1']:.4f}"
        )


def _evaluate_test_split(
    run_dir: Path, config: Any, card: RunCard, module: Any, contract: InputContract
) -> None:
    from perito_training.datasets import prepare_data
    from perito_training.evaluation import predict_probabilities
    from perito_training.metrics import classification_report

    data = prepare_data(config.data, contract.spec())
    dataset = card.training.dataset
    if dataset is None:
        click.echo("warning: the card records no data fingerprint to check the data against")
    elif data.fingerprint != dataset.fingerprint_sha256:
        click.echo("warning: the data differs from what the run was trained on (fingerprint)")
    test = data.splits["test"]
    probabilities = predict_probabilities(module, test, config.train.eval_batch_size)
    report = classification_report(test.targets, probabilities, data.classes)
    (run_dir / "evaluations").mkdir(exist_ok=True)
    (run_dir / "evaluations" / "test.json").write_text(json.dumps(report, indent=2) + "\n")
    click.echo(
        f"test: {report['images']} images, accuracy {report['accuracy']:.4f} "
        f"(card: {_card_figure(card.metrics.accuracy)}), "
        f"macro F1 {report['macro_avg']['f1']:.4f}"
    )
    for name, row in report["per_class"].items():
        click.echo(
            f"  {name:>20}  precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
            f"F1 {row['f1']:.3f}  n={row['support']}"
        )


def _card_figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@click.command("publish")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--name", help="Model name (default: the config's name).")
@click.option("--description", help="Replaces the config's description in the card.")
@registry_option
@alias_option
@click.option("--json", "as_json", is_flag=True, help="Print the published manifest as JSON.")
@forms_option("the validation split; held out: the test split")
@min_agreement_option
@max_accuracy_drop_option
def publish(
    run_dir: Path,
    name: str | None,
    description: str | None,
    registry: str | None,
    aliases: tuple[str, ...],
    as_json: bool,
    forms: tuple[str, ...],
    min_agreement: float,
    max_accuracy_drop: float,
) -> None:
    """Publish a finished run as a new immutable model version; its card is the manifest.

    \b
    Example:
      perito publish runs/car-damage --registry s3://models --alias staging
      perito publish runs/car-damage --forms fp32,int8,bf16
    """
    gate = (forms, min_agreement, max_accuracy_drop)
    _publish(run_dir, name, registry, aliases, description, as_json, gate)


def _publish(
    run_dir: Path,
    name: str | None,
    registry: str | None,
    aliases: tuple[str, ...],
    description: str | None,
    as_json: bool = False,
    gate: tuple[tuple[str, ...], float, float] = ((), 0.99, 0.003),
) -> None:
    from perito_core.access.audit import record_command
    from perito_core.errors import PeritoError
    from perito_core.logs import building_forms_quietly
    from perito_core.settings import CommonSettings
    from perito_training.pipeline import RunError, load_run, publish_run

    settings = CommonSettings() if registry is None else CommonSettings(registry=registry)
    try:
        model = name or load_run(run_dir)[1].name
        # The tenant of PERITO_TOKEN must hold models:publish and may use this model.
        publisher = settings.acting_tenant("models:publish", f"publish model {model!r}", model)
    except RunError as error:
        raise click.ClickException(str(error)) from None
    except PeritoError as error:
        raise click.ClickException(f"{error.message} (PERITO_TOKEN)") from None
    target = settings.open_registry()

    def audit(**record: str) -> None:
        """The publish's audit record (`record_command`): printed only when not stored in a
        Redis the user configured."""
        unstored = record_command(
            settings, tenant=publisher.name, method="models.publish", **record
        )
        if unstored:
            click.echo(unstored, err=True)

    try:
        # torch's TorchScript deprecation and CUDA probe notices, when it builds forms
        with building_forms_quietly():
            manifest = publish_run(
                run_dir,
                target,
                name=name,
                aliases=aliases,
                description=description,
                published_by=publisher.name,
                forms=gate[0],
                min_agreement=gate[1],
                max_accuracy_drop=gate[2],
                log=click.echo,
            )
    except (PeritoError, RunError) as error:
        outcome = error.code.name if isinstance(error, PeritoError) else "FAILED_PRECONDITION"
        audit(resource=f"models/{model}", outcome=outcome)
        raise click.ClickException(getattr(error, "message", str(error))) from None
    audit(
        resource=f"models/{manifest.name}/versions/{manifest.version}",
        outcome="OK",
        detail=f"aliases: {', '.join(aliases)}" if aliases else "",
    )
    if as_json:
        click.echo(manifest.model_dump_json(indent=2))
        return
    alias_note = f" (aliases: {', '.join(aliases)})" if aliases else ""
    click.echo(f"published {manifest.name}@{manifest.version} to {target.description}{alias_note}")
    if manifest.forms or manifest.skipped_forms:
        served = ", ".join(form.name for form in manifest.forms) or "none"
        click.echo(f"compiled forms: {served} (the gate's evidence is in the manifest)")


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
    if all(importlib.util.find_spec(name) for name in ("torch", "timm", "matplotlib", "yaml")):
        for command in (train, evaluate, publish, export_pretrained):
            cli.add_command(command)
