"""Classification metrics, calibration and temperature scaling: plain numpy, no torch.

Definitions follow scikit-learn (tests compare against it): precision / recall / F1 of a class
with no predictions (or no examples) are 0; ROC AUC is the Mann-Whitney statistic with ties
counted half; one-vs-rest AUC is averaged over classes that have both positives and negatives.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Temperature scaling, ECE and the confidence threshold are shared with publish-time form
# building, so they live in core; re-exported here for the figures of a run's model card.
from perito_core.models.calibration import (
    confidence_threshold,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_curve,
    softmax,
)

__all__ = [
    "classification_report",
    "confidence_threshold",
    "confusion_matrix",
    "expected_calibration_error",
    "fit_temperature",
    "negative_log_likelihood",
    "per_class_scores",
    "reliability",
    "reliability_curve",
    "roc_auc",
    "roc_auc_binary",
    "roc_curve",
    "softmax",
]


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (targets, predicted), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    precision = np.divide(
        true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0
    )
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def roc_auc_binary(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    positives = int(positive.sum())
    negatives = len(positive) - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = _average_ranks(scores)
    rank_sum = float(ranks[positive.astype(bool)].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="mergesort")
    hits = positive[order].astype(np.float64)
    sorted_scores = scores[order]
    distinct = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(hits) - 1]
    true_positives = np.cumsum(hits)[distinct]
    false_positives = (distinct + 1) - true_positives
    tpr = np.r_[0.0, true_positives / max(hits.sum(), 1.0)]
    fpr = np.r_[0.0, false_positives / max(len(hits) - hits.sum(), 1.0)]
    return fpr, tpr


def roc_auc(targets: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Binary AUC (positive = class 1) or one-vs-rest AUC per class, macro and weighted."""
    num_classes = probabilities.shape[1]
    if num_classes == 2:
        return {"binary": roc_auc_binary(targets == 1, probabilities[:, 1])}
    per_class = [roc_auc_binary(targets == c, probabilities[:, c]) for c in range(num_classes)]
    defined = [
        (auc, int((targets == c).sum())) for c, auc in enumerate(per_class) if auc is not None
    ]
    macro = float(np.mean([auc for auc, _ in defined])) if defined else None
    weight = sum(n for _, n in defined)
    weighted = sum(auc * n for auc, n in defined) / weight if weight else None
    return {"ovr_macro": macro, "ovr_weighted": weighted, "per_class": per_class}


def reliability(
    probabilities: np.ndarray, targets: np.ndarray, bins: int = 15
) -> dict[str, list[float]]:
    """Per equal-width confidence bin: mean confidence (the bin's middle when empty),
    accuracy (0 when empty) and count: `reliability_curve` as the reliability plot reads it."""
    curve = reliability_curve(probabilities, targets, bins)
    return {
        "confidence": [
            b["confidence"] if b["count"] else (b["lower"] + b["upper"]) / 2 for b in curve
        ],
        "accuracy": [b["accuracy"] if b["count"] else 0.0 for b in curve],
        "count": [float(b["count"]) for b in curve],
    }


def classification_report(
    targets: np.ndarray, probabilities: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """Everything the model card says about one split: JSON-ready."""
    num_classes = len(classes)
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(targets, predicted, num_classes)
    scores = per_class_scores(matrix)
    support = scores["support"]
    weights = support / support.sum() if support.sum() else support
    averages = {
        kind: {
            metric: float(
                scores[metric].mean() if kind == "macro" else (scores[metric] * weights).sum()
            )
            for metric in ("precision", "recall", "f1")
        }
        for kind in ("macro", "weighted")
    }
    return {
        "images": len(targets),
        "accuracy": float((predicted == targets).mean()) if len(targets) else 0.0,
        "per_class": {
            name: {
                "precision": float(scores["precision"][i]),
                "recall": float(scores["recall"][i]),
                "f1": float(scores["f1"][i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "macro_avg": averages["macro"],
        "weighted_avg": averages["weighted"],
        "confusion_matrix": {"labels": classes, "matrix": matrix.tolist()},
        "roc_auc": roc_auc(targets, probabilities),
        "ece": expected_calibration_error(probabilities, targets),
    }
