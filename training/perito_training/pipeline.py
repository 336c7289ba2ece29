"""From a config to a run folder, and from a run folder to a published model version.

A run folder holds everything about one training run:

    config.yaml          the resolved configuration
    dataset.json         classes, split sizes, unreadable files, the data fingerprint
    history.json / .csv  per-epoch loss, accuracy and learning rate
    checkpoints/         last.pt (resume) and best.pt (the chosen epoch's weights)
    model.pt, labels.txt the TorchScript artifact (uint8 in, calibrated probabilities out)
    card.json            the model card: what `perito publish` puts into the manifest
    metrics.json         test and validation reports, calibration
    predictions/         test.csv: each test image's top-3
    plots/               learning_curves.png, confusion_matrix.png, roc.png, reliability.png
    report.md            the card for people
"""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from perito_core.drift import build_reference
from perito_core.models.card import (
    Calibration,
    DatasetRecord,
    DriftReference,
    Metrics,
    QualityThresholds,
    Source,
    TrainingRecord,
    unknown_fields,
)
from perito_core.models.engines.base import BuiltForms
from perito_core.models.gate import build_forms
from perito_core.models.manifest import (
    MAX_ACCURACY_DROP,
    MIN_AGREEMENT,
    InputContract,
    ModelManifest,
    RunCard,
)
from perito_core.models.registry import ModelRegistry
from perito_core.quality import fit_thresholds
from perito_training import plots
from perito_training.config import TrainConfig, load_config
from perito_training.datasets import ImageSet, PreparedData, prepare_data
from perito_training.evaluation import (
    image_batches,
    load_module,
    predict_probabilities,
    write_predictions,
)
from perito_training.export import ImageClassifier, save_torchscript
from perito_training.metrics import (
    classification_report,
    confidence_threshold,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_curve,
    softmax,
)
from perito_training.trainer import Log, Trainer, TrainState, input_contract, predict_logits

# Scripted and eager outputs of the exported module must agree to this (probabilities).
EXPORT_TOLERANCE = 1e-4
PUBLISHED_FILE = "published.json"
"""In a run folder: the versions it was published as (`published_as`), so that the run that
a version came from is not trained further in place."""


class RunError(RuntimeError):
    """The run folder is not in a state that allows this (no model yet, a run already there)."""


def train_run(
    config: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    log: Log = print,
    progress: bool = True,
) -> RunCard:
    """Train, calibrate, export and evaluate `config` into `run_dir`; returns the card.

    A new run that fails before its first checkpoint leaves no folder behind (it created
    `run_dir`); one that fails later keeps its checkpoints, to resume.

    Raises:
        RunError: `run_dir` already holds a run (and `resume` is not set), holds nothing to
            resume, or was published (`published_as`): resuming would rewrite the model.pt
            and card a version was published from (`fork_run` continues it elsewhere).
        ConfigError, DatasetError, ValueError: as the data and the trainer raise them.
    """
    checkpoint = run_dir / "checkpoints" / "last.pt"
    if checkpoint.exists() and not resume:
        raise RunError(f"{run_dir} already holds a run: resume it (--resume) or use another --out")
    if resume:
        _require_checkpoint(run_dir)
    if resume and (published := published_as(run_dir)):
        raise RunError(
            f"{run_dir} was published as {', '.join(published)}: resuming it in place would "
            "rewrite the model.pt and card that version came from; continue it in a new "
            f"folder: perito train --resume {run_dir} --out NEW_FOLDER"
        )
    created = not run_dir.exists()
    try:
        return _train_run(config, run_dir, resume=resume, log=log, progress=progress)
    except BaseException:
        if created and not checkpoint.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train_run(
    config: TrainConfig, run_dir: Path, *, resume: bool, log: Log, progress: bool
) -> RunCard:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config.to_yaml())

    trainer = Trainer(config, run_dir, log=log, progress=progress)
    contract = input_contract(config, trainer.architecture)
    log(f"preparing data ({config.data.kind}) at {contract.height}x{contract.width}")
    data = prepare_data(config.data, contract.spec(), threads=max(2, torch.get_num_threads()))
    summary = data.summary()
    (run_dir / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    sizes = ", ".join(f"{name} {len(split)}" for name, split in data.splits.items())
    log(f"{len(data.classes)} classes ({', '.join(data.classes)}); {sizes}")
    if data.unreadable:
        log(f"{len(data.unreadable)} unreadable image(s) left out (listed in dataset.json):")
        for item in data.unreadable[:10]:
            log(f"  {item.name}: {item.reason}")
    model, state = trainer.fit(data.splits["train"], data.splits["val"], resume=resume)
    _write_history(run_dir, state)
    return finish_run(config, contract, run_dir, model, data, state, trainer.device, log=log)


def published_as(run_dir: Path) -> list[str]:
    """The versions `run_dir` was published as, `name@version`, oldest first ([] if none)."""
    path = run_dir / PUBLISHED_FILE
    if not path.is_file():
        return []
    records = json.loads(path.read_text())
    return [f"{record['model']}@{record['version']}" for record in records]


def _require_checkpoint(run_dir: Path) -> None:
    """Raises RunError unless `run_dir` holds a run to resume (`checkpoints/last.pt`)."""
    if not (run_dir / "checkpoints" / "last.pt").exists():
        raise RunError(f"nothing to resume in {run_dir}: no checkpoints/last.pt")


def fork_run(source: Path, target: Path) -> None:
    """Copy the run in `source` (its config and checkpoints, not its exported model, card or
    publications) into the new folder `target`, to train it further there (`train_run` with
    `resume`).

    Raises:
        RunError: `source` has no checkpoint, or `target` exists and is not empty.
    """
    _require_checkpoint(source)
    if target.exists() and any(target.iterdir()):
        raise RunError(f"{target} is not empty: --out names a new folder to continue the run in")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "config.yaml", target / "config.yaml")
    shutil.copytree(source / "checkpoints", target / "checkpoints")


def _record_publication(run_dir: Path, manifest: ModelManifest, registry: ModelRegistry) -> None:
    path = run_dir / PUBLISHED_FILE
    records = json.loads(path.read_text()) if path.is_file() else []
    records.append(
        {
            "model": manifest.name,
            "version": manifest.version,
            "registry": registry.description,
            "sha256": manifest.artifact.sha256,
            "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    path.write_text(json.dumps(records, indent=2) + "\n")


def finish_run(
    config: TrainConfig,
    contract: InputContract,
    run_dir: Path,
    model: ImageClassifier,
    data: PreparedData,
    state: TrainState,
    device: torch.device,
    *,
    log: Log = print,
) -> RunCard:
    """Calibrate on validation, export, evaluate the artifact on test, write card and plots."""
    classes = data.classes
    val, test = data.splits["val"], data.splits["test"]
    batch = config.train.eval_batch_size
    val_logits = predict_logits(model, val, batch, device)
    temperature = 1.0
    if config.calibration.temperature_scaling and len(val) > 0:
        temperature = fit_temperature(val_logits, val.targets)
    model = model.cpu().eval()
    model.temperature.fill_(temperature)
    model_path = run_dir / "model.pt"
    scripted = save_torchscript(model, model_path)
    (run_dir / "labels.txt").write_text("\n".join(classes) + "\n")
    export_diff = _check_export(model, scripted, test if len(test) else val)
    log(
        f"exported {model_path} (temperature {temperature:.3f}; "
        f"scripted vs eager max diff {export_diff:.1e})"
    )

    # The published figures are the artifact's own, reloaded from disk.
    artifact = load_module(model_path)
    test_probabilities = predict_probabilities(artifact, test, batch)
    test_report = classification_report(test.targets, test_probabilities, classes)
    val_probabilities = (
        softmax(val_logits / temperature) if len(val) else np.zeros((0, len(classes)))
    )
    val_report = classification_report(val.targets, val_probabilities, classes) if len(val) else {}
    test_uncalibrated = softmax(np.log(np.clip(test_probabilities, 1e-12, 1.0)) * temperature)
    calibration: dict[str, Any] = {
        "method": "temperature_scaling" if config.calibration.temperature_scaling else "none",
        "temperature": temperature,
        "fitted_on": "val",
        "ece_test_before": expected_calibration_error(test_uncalibrated, test.targets),
        "ece_test_after": test_report["ece"],
        "reliability": reliability_curve(test_probabilities, test.targets),
    }
    if len(val):
        calibration["nll_val_before"] = negative_log_likelihood(val_logits, val.targets, 1.0)
        calibration["nll_val_after"] = negative_log_likelihood(val_logits, val.targets, temperature)
    threshold = None
    if config.calibration.target_accuracy is not None and len(val):
        threshold = confidence_threshold(
            val_probabilities, val.targets, config.calibration.target_accuracy
        )
        calibration["confidence_threshold"] = threshold

    metrics = {"test": test_report, "val": val_report, "export_max_abs_diff": export_diff}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions(
        run_dir / "predictions" / "test.csv", test.names, test.targets, test_probabilities, classes
    )
    plot_dir = run_dir / "plots"
    plots.learning_curves(state.history, plot_dir / "learning_curves.png")
    plots.confusion_matrix(
        test_report["confusion_matrix"]["matrix"], classes, plot_dir / "confusion_matrix.png"
    )
    plots.roc_curves(
        test.targets, test_probabilities, classes, test_report["roc_auc"], plot_dir / "roc.png"
    )
    plots.reliability_diagram(
        test.targets,
        test_uncalibrated,
        test_probabilities,
        (calibration["ece_test_before"], calibration["ece_test_after"]),
        plot_dir / "reliability.png",
    )
    card = RunCard(
        name=config.name,
        description=config.description,
        labels=classes,
        input=contract,
        confidence_threshold=threshold["threshold"] if threshold else None,
        metrics=_card_metrics(test_report, val_report),
        calibration=Calibration.model_validate(calibration),
        training=TrainingRecord(
            config=config.model_dump(mode="json"),
            dataset=DatasetRecord.model_validate(
                {k: v for k, v in data.summary().items() if k not in ("skipped",)}
            ),
            epochs_run=state.epoch,
            best_epoch=state.best_epoch,
            stopped_early=state.stopped_early,
            seconds=round(sum(row["seconds"] for row in state.history), 1),
        ),
        source=Source.model_validate(code_version()),
        quality=_fitted_quality(data),
        drift=_drift_reference(test_probabilities, data),
    )
    # The card's parts are open to fields they do not declare (cards of other trainers must
    # load), so a field this trainer adds without declaring it in `perito_core.models.card`
    # (or misspells) is kept untyped: said here, and refused by tests/unit/test_model_card.py.
    if unknown := unknown_fields(card):
        log(f"warning: model card fields not in its schema: {', '.join(unknown)}")
    (run_dir / "card.json").write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    (run_dir / "report.md").write_text(render_report(card))
    log(
        f"test accuracy {test_report['accuracy']:.4f}  "
        f"macro F1 {test_report['macro_avg']['f1']:.4f}  "
        f"ECE {calibration['ece_test_before']:.3f} -> {calibration['ece_test_after']:.3f}"
        + (f"  uncertain below {threshold['threshold']:.3f}" if threshold else "")
    )
    return card


def _fitted_quality(data: PreparedData) -> QualityThresholds:
    """The photo-quality thresholds fitted on the training images' own measures (empty,
    the defaults, when none were measured)."""
    measures = data.train_quality
    if not measures:
        return QualityThresholds()
    return fit_thresholds(measures, f"train split, {len(measures)} images")


def _drift_reference(test_probabilities: np.ndarray, data: PreparedData) -> DriftReference:
    """The card's drift reference (`perito_core.drift`): the served probabilities of the
    held-out test split, the photo-quality measures of the training images; empty without a
    test split."""
    if not len(test_probabilities):
        return DriftReference()
    return build_reference(
        test_probabilities,
        data.classes,
        data.train_quality,
        built_on=f"test split, {len(test_probabilities)} images",
    )


def _card_metrics(test: dict[str, Any], val: dict[str, Any]) -> Metrics:
    """The model card's metrics: the test report in full, validation's headline."""
    metrics = dict(test)
    metrics["split"] = "test"
    if val:
        metrics["val_accuracy"] = val["accuracy"]
    return Metrics.model_validate(metrics)


@torch.no_grad()
def _check_export(
    model: ImageClassifier, scripted: torch.jit.ScriptModule, sample: ImageSet
) -> float:
    """Largest difference between eager and scripted probabilities on real images."""
    images = next(image_batches(sample, 32), None)
    if images is None:
        return 0.0
    eager = model(images)
    exported = scripted(images)
    diff = float((eager - exported).abs().max())
    if diff > EXPORT_TOLERANCE:
        raise RunError(f"the exported module differs from the trained one by {diff:.2e}")
    return diff


def _write_history(run_dir: Path, state: TrainState) -> None:
    (run_dir / "history.json").write_text(json.dumps(state.history, indent=2) + "\n")
    if state.history:
        with (run_dir / "history.csv").open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(state.history[0]))
            writer.writeheader()
            writer.writerows(state.history)


def code_version() -> dict[str, Any]:
    """Which code trained the model: package versions and, from a checkout, the git commit."""
    version: dict[str, Any] = {"torch": torch.__version__}
    for package in ("perito", "torchvision", "timm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            version[package] = importlib.metadata.version(package)
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode == 0:
            version["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            version["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def render_report(card: RunCard) -> str:
    """The model card as Markdown (a figure the card does not hold reads `n/a`)."""
    metrics, calibration, training = card.metrics, card.calibration, card.training
    fingerprint = training.dataset.fingerprint_sha256[:16] if training.dataset else None
    macro, weighted = metrics.macro_avg, metrics.weighted_avg
    lines = [
        f"# {card.name}",
        "",
        card.description,
        "",
        f"- Architecture: `{_figure(training.architecture)}`, input "
        f"{card.input.height}x{card.input.width} ({card.input.resize_mode})",
        f"- Trained {_figure(training.epochs_run)} epochs (best: {_figure(training.best_epoch)}) "
        f"in {_figure(training.seconds, '.0f')} s; data fingerprint `{_figure(fingerprint)}`",
        f"- Test accuracy **{_figure(metrics.accuracy, '.4f')}** on {_figure(metrics.images)} "
        f"images; macro F1 {_figure(macro.f1 if macro else None, '.4f')}, "
        f"weighted F1 {_figure(weighted.f1 if weighted else None, '.4f')}",
        f"- Calibration: temperature {_figure(calibration.temperature, '.3f')}, test ECE "
        f"{_figure(calibration.ece_test_before, '.4f')} -> "
        f"{_figure(calibration.ece_test_after, '.4f')}",
    ]
    threshold = calibration.confidence_threshold
    if threshold is not None:
        lines.append(
            f"- Confidence threshold {threshold.threshold:.3f}: validation predictions above it "
            f"were {threshold.accuracy_above:.1%} right and covered {threshold.coverage:.1%} "
            "of images; below it `Classify` marks a prediction uncertain"
        )
    auc = metrics.roc_auc
    if auc is not None and auc.binary is not None:
        lines.append(f"- ROC AUC {auc.binary:.4f}")
    elif auc is not None and auc.ovr_macro is not None:
        lines.append(f"- ROC AUC (one-vs-rest, macro) {auc.ovr_macro:.4f}")
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, row in (metrics.per_class or {}).items():
        lines.append(
            f"| {name} | {row.precision:.4f} | {row.recall:.4f} | {row.f1:.4f} | {row.support} |"
        )
    lines += [
        "",
        "![learning curves](plots/learning_curves.png)",
        "![confusion matrix](plots/confusion_matrix.png)",
        "![ROC](plots/roc.png)",
        "![reliability](plots/reliability.png)",
        "",
    ]
    return "\n".join(lines)


def _figure(value: float | str | None, spec: str = "") -> str:
    """`value` formatted by `spec`, or `n/a` when the card does not hold it."""
    return "n/a" if value is None else format(value, spec)


def load_run(run_dir: Path) -> tuple[TrainConfig, RunCard]:
    """A finished run's config and card."""
    card_path = run_dir / "card.json"
    if not card_path.exists():
        raise RunError(f"{run_dir} has no finished run (no card.json): train it first")
    config = load_config(run_dir / "config.yaml")
    try:
        card = RunCard.model_validate_json(card_path.read_bytes())
    except ValidationError as error:
        raise RunError(f"{card_path} is not a model card: {error}") from None
    return config, card


def publish_run(
    run_dir: Path,
    registry: ModelRegistry,
    *,
    name: str | None = None,
    aliases: tuple[str, ...] = (),
    description: str | None = None,
    published_by: str = "",
    forms: tuple[str, ...] = (),
    min_agreement: float = MIN_AGREEMENT,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    log: Log = print,
) -> ModelManifest:
    """Publish a finished run as the next version of its model; the manifest is its card.

    The artifact is loaded and run through the serving runtime first, so a module that
    serving cannot load is never published. `published_by` (the publishing tenant) is
    recorded in the manifest's `source`. `forms` (precisions: fp32, int8, bf16) are built
    beside model.pt (`perito_core.models.gate`): INT8 is calibrated on the run's validation
    images, and every form is gated on the test split (top-1 agreement with model.pt under
    `min_agreement`, or test accuracy more than `max_accuracy_drop` under it: refused, the
    reason printed and recorded in the manifest's `skipped_forms`).
    """
    config, card = load_run(run_dir)
    model_path = run_dir / "model.pt"
    contract = card.input
    _check_serving_loads(model_path, card, contract)
    built = BuiltForms()
    if forms:
        built = build_run_forms(
            config, contract, run_dir, forms, min_agreement, max_accuracy_drop, log=log
        )
    manifest = registry.publish(
        name or card.name,
        model_path,
        labels=card.labels,
        input=contract,
        description=card.description if description is None else description,
        confidence_threshold=card.confidence_threshold,
        metrics=card.metrics,
        calibration=card.calibration,
        training=card.training,
        source=card.source.model_copy(
            update={"run": run_dir.name, **({"published_by": published_by} if published_by else {})}
        ),
        quality=card.quality,
        drift=card.drift,
        aliases=aliases,
        forms=built.forms,
        skipped_forms=built.skipped,
    )
    _record_publication(run_dir, manifest, registry)
    return manifest


def build_run_forms(
    config: TrainConfig,
    contract: InputContract,
    run_dir: Path,
    precisions: tuple[str, ...],
    min_agreement: float = MIN_AGREEMENT,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    *,
    log: Log = print,
) -> BuiltForms:
    """Compiled forms of a run's model.pt: calibrated (INT8, temperature, threshold) on
    validation, gated on test."""
    log(f"building compiled forms ({', '.join(precisions)}): preparing validation and test")
    data = prepare_data(config.data, contract.spec(), threads=max(2, torch.get_num_threads()))
    val, test = data.splits["val"], data.splits["test"]
    held_out, evaluated_on = (test, "test") if len(test) else (val, "val")
    calibration = val if len(val) else held_out
    built = build_forms(
        run_dir / "model.pt",
        contract,
        run_dir / "forms",
        calibration=_images(calibration),
        holdout=_images(held_out),
        holdout_targets=held_out.targets,
        # Each form's temperature and threshold are re-fitted on the validation split, as the
        # trainer fitted model.pt's, not on the test split that gates it.
        calibration_targets=calibration.targets,
        target_accuracy=config.calibration.target_accuracy,
        evaluated_on=f"{evaluated_on} split",
        precisions=precisions,
        min_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop,
    )
    for line in built.summary():
        log(line)
    return built


def _images(split: ImageSet) -> np.ndarray:
    return np.stack([split.image(i) for i in range(len(split))])


def _check_serving_loads(model_path: Path, card: RunCard, contract: InputContract) -> None:
    from perito_core.models.engines.torchscript import TorchScriptModel
    from perito_core.models.manifest import Artifact, sha256_file

    draft = ModelManifest(
        name=card.name,
        version="0",
        labels=card.labels,
        input=contract,
        artifact=Artifact(sha256=sha256_file(model_path), size_bytes=model_path.stat().st_size),
    )
    TorchScriptModel.load(model_path, draft, device="cpu", optimize=False)
