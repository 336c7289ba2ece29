"""PNG plots for a run: learning curves, confusion matrix, ROC curves, reliability diagram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt
import numpy as np

from perito_core.plots import confusion_heatmap
from perito_training.metrics import reliability, roc_curve


def learning_curves(history: list[dict[str, float]], path: Path) -> Path:
    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        loss_axes.plot(epochs, [row[f"{split}_loss"] for row in history], marker="o", label=split)
        accuracy_axes.plot(
            epochs, [row[f"{split}_accuracy"] for row in history], marker="o", label=split
        )
    loss_axes.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    accuracy_axes.set(title="Accuracy", xlabel="epoch", ylabel="accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    return _save(figure, path)


def confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path) -> Path:
    """The test split's confusion matrix (true classes as rows) as a heat map PNG."""
    return confusion_heatmap(
        np.asarray(matrix),
        labels,
        labels,
        path,
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix (test)",
        colorbar="share of the true class",
        dpi=110,
    )


def roc_curves(
    targets: np.ndarray,
    probabilities: np.ndarray,
    labels: list[str],
    auc: dict[str, Any],
    path: Path,
) -> Path:
    figure, axes = plt.subplots(figsize=(6, 6))
    if len(labels) == 2:
        fpr, tpr = roc_curve(targets == 1, probabilities[:, 1])
        value = auc.get("binary")
        axes.plot(
            fpr, tpr, label=f"{labels[1]} (AUC {value:.3f})" if value is not None else labels[1]
        )
    else:
        for c, label in enumerate(labels):
            if not (targets == c).any() or (targets == c).all():
                continue
            fpr, tpr = roc_curve(targets == c, probabilities[:, c])
            value = auc["per_class"][c]
            axes.plot(fpr, tpr, label=f"{label} (AUC {value:.3f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    axes.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC (test)")
    axes.legend(fontsize=8, loc="lower right")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def reliability_diagram(
    targets: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    ece: tuple[float, float],
    path: Path,
) -> Path:
    figure, axes = plt.subplots(figsize=(6, 6))
    for probabilities, name, value in (
        (before, "uncalibrated", ece[0]),
        (after, "temperature-scaled", ece[1]),
    ):
        bins = reliability(probabilities, targets)
        used = [i for i, n in enumerate(bins["count"]) if n > 0]
        axes.plot(
            [bins["confidence"][i] for i in used],
            [bins["accuracy"][i] for i in used],
            marker="o",
            label=f"{name} (ECE {value:.3f})",
        )
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect")
    axes.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", title="Reliability (test)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
