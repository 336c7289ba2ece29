"""Compare finished runs side by side: one table of what each reached and what it cost.

A data scientist trying architectures on one data set (the minerals seed compared a 4-conv
CNN, a 5-conv CNN and a transfer-learned network) wants one table, not three cards. The
rows come from each run's `card.json`, so they are the exported artifacts' own test figures.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


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
    """The headline figures of a finished run (`FileNotFoundError` before it has a card)."""
    card = json.loads((run_dir / "card.json").read_text())
    metrics, training = card["metrics"], card["training"]
    auc = metrics["roc_auc"]
    return RunSummary(
        run=run_dir.name,
        architecture=training["config"]["model"]["architecture"],
        input_size=int(card["input"]["height"]),
        epochs=int(training["epochs_run"]),
        train_seconds=float(training["seconds"]),
        test_images=int(metrics["images"]),
        accuracy=float(metrics["accuracy"]),
        macro_f1=float(metrics["macro_avg"]["f1"]),
        roc_auc=auc.get("binary") if auc.get("binary") is not None else auc.get("ovr_macro"),
        ece=float(card["calibration"]["ece_test_after"]),
        model_megabytes=(run_dir / "model.pt").stat().st_size / 1e6,
    )


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
