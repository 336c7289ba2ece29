"""Compare finished runs side by side: one table of what each reached and what it cost.

A data scientist trying architectures on one data set (the minerals seed compared a 4-conv
CNN, a 5-conv CNN and a transfer-learned network) wants one table, not three cards. The
rows come from each run's `card.json`, so they are the exported artifacts' own test figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from perito_core.models.card import RocAuc
from perito_core.models.manifest import RunCard

_T = TypeVar("_T")


@dataclass(frozen=True)
class RunSummary:
    """One run's headline figures, from its model card."""

    run: str
    architecture: str
    input_size: int
    epochs: int
    train_seconds: float
    test_images: int
    accuracy: float
    macro_f1: float
    roc_auc: float | None
    ece: float
    model_megabytes: float


def summarize_run(run_dir: Path) -> RunSummary:
    """The headline figures of a finished run (`FileNotFoundError` before it has a card;
    `ValueError` for a card that is not one, or lacks a figure)."""
    card = RunCard.model_validate_json((run_dir / "card.json").read_bytes())
    metrics, training = card.metrics, card.training
    auc = metrics.roc_auc or RocAuc()
    return RunSummary(
        run=run_dir.name,
        architecture=_held(training.architecture, "training.config.model.architecture"),
        input_size=card.input.height,
        epochs=_held(training.epochs_run, "training.epochs_run"),
        train_seconds=_held(training.seconds, "training.seconds"),
        test_images=_held(metrics.images, "metrics.images"),
        accuracy=_held(metrics.accuracy, "metrics.accuracy"),
        macro_f1=_held(metrics.macro_avg, "metrics.macro_avg").f1,
        roc_auc=auc.binary if auc.binary is not None else auc.ovr_macro,
        ece=_held(card.calibration.ece_test_after, "calibration.ece_test_after"),
        model_megabytes=(run_dir / "model.pt").stat().st_size / 1e6,
    )


def _held(value: _T | None, field: str) -> _T:
    """`value`, which a trainer's card always holds; `ValueError` naming `field` if absent."""
    if value is None:
        raise ValueError(f"the run's card.json has no {field}")
    return value


def comparison_table(runs: Sequence[RunSummary]) -> str:
    """A Markdown table with one row per run, best test accuracy first."""
    lines = [
        "| run | architecture | input | epochs | training s | test images | accuracy "
        "| macro F1 | ROC AUC | ECE | model MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(runs, key=lambda r: -r.accuracy):
        auc = "n/a" if row.roc_auc is None else f"{row.roc_auc:.4f}"
        lines.append(
            f"| {row.run} | {row.architecture} | {row.input_size} | {row.epochs} "
            f"| {row.train_seconds:.0f} | {row.test_images} | {row.accuracy:.4f} "
            f"| {row.macro_f1:.4f} | {auc} | {row.ece:.4f} | {row.model_megabytes:.1f} |"
        )
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: Sequence[Path], out: Path | None = None) -> str:
    """The comparison table of `run_dirs`, also written to `out` (Markdown) when given."""
    table = comparison_table([summarize_run(run_dir) for run_dir in run_dirs])
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    return table
