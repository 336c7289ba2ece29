"""Calibration of a served form: temperature scaling, the `uncertain` threshold, and ECE.

Plain numpy, shared by publish-time form building (`perito_core.models.gate`) and serving
(`perito_core.models.engines`), and by training (`perito_training.metrics` re-exports them for
the figures of a run's model card):

- temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017):
  one scalar T dividing the logits before the softmax, fitted by minimising the negative
  log-likelihood on labelled data; it never changes the top-1 class;
- the expected calibration error over 15 equal-width confidence bins (same paper, eq. 3), and
  the reliability curve over the same bins (the model card's, read by each answer's
  `expected_accuracy`);
- the confidence threshold: the lowest top-1 probability above which predictions reach a
  target accuracy.

A compiled form returns probabilities already scaled by the artifact's temperature, so its
re-fit temperature is relative: `softmax(log(p) / t)`, `log(p)` being the artifact's scaled
logits up to a per-row constant, which the softmax ignores.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

# Probabilities are clipped here before the log: FP32 softmax underflows to 0 for far classes.
LOG_FLOOR = 1e-30


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float logits (N, C); float64 or float32 as given."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """float64 log of probabilities (N, C), clipped at `LOG_FLOOR`: logits up to a constant."""
    return np.log(np.clip(probabilities.astype(np.float64), LOG_FLOOR, 1.0))


def rescale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """`softmax(log(p) / temperature)` for probabilities (N, C), as float32 (N, C).

    Raises:
        ValueError: temperature not positive.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    if temperature == 1.0:
        return probabilities.astype(np.float32, copy=False)
    return softmax(log_probabilities(probabilities) / temperature).astype(np.float32)


def negative_log_likelihood(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """Mean NLL of softmax(logits / temperature) (N, C) for int class indices `targets` (N,)."""
    scaled = logits / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_norm - shifted[np.arange(len(targets)), targets]))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (Guo et al. 2017).

    Args:
        logits: float (N, C), N >= 1 (or log-probabilities: the same up to a row constant).
        targets: int class indices (N,).

    NLL is convex in 1/T, so a golden-section search over log T in [0.05, 20] finds it.
    """
    low, high = math.log(0.05), math.log(20.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa = negative_log_likelihood(logits, targets, math.exp(a))
    fb = negative_log_likelihood(logits, targets, math.exp(b))
    for _ in range(60):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = negative_log_likelihood(logits, targets, math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = negative_log_likelihood(logits, targets, math.exp(b))
    return math.exp((low + high) / 2)


def confidence_threshold(
    probabilities: np.ndarray, targets: np.ndarray, target_accuracy: float
) -> dict[str, float] | None:
    """The lowest top-1 probability at which predictions are at least `target_accuracy` right.

    Args:
        probabilities: float (N, C); targets: int class indices (N,).

    Returns:
        `threshold`, the share of images it leaves confident (`coverage`), their accuracy
        (`accuracy_above`) and `target_accuracy`; None when no threshold reaches the target.
    """
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == targets).astype(np.float64)
    order = np.argsort(-confidence, kind="mergesort")
    running = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    # Only thresholds between distinct confidences can be applied.
    sorted_conf = confidence[order]
    boundary = np.r_[sorted_conf[1:] < sorted_conf[:-1], True]
    reaching = np.nonzero((running >= target_accuracy) & boundary)[0]
    if len(reaching) == 0:
        return None
    last = int(reaching[-1])
    return {
        "threshold": float(sorted_conf[last]),
        "coverage": (last + 1) / len(order),
        "accuracy_above": float(running[last]),
        "target_accuracy": target_accuracy,
    }


def reliability_curve(
    probabilities: np.ndarray, targets: np.ndarray, bins: int = 15
) -> list[dict[str, Any]]:
    """The top-1 accuracy in each of `bins` equal-width confidence bins (the bins of
    `expected_calibration_error`): what a reliability diagram plots, and what the model
    card's `calibration.reliability` holds.

    Args:
        probabilities: float (N, C); targets: int class indices (N,).

    Returns:
        One dict per bin, lowest first: `lower` and `upper` (the bin holds top-1
        probabilities p with lower < p <= upper), `count` (images, an int), `accuracy` (the
        share whose top-1 class is right) and `confidence` (their mean top-1 probability);
        `accuracy` and `confidence` are None for an empty bin.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    curve: list[dict[str, Any]] = []
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        count = int(inside.sum())
        curve.append(
            {
                "lower": round(float(low), 6),
                "upper": round(float(high), 6),
                "count": count,
                "accuracy": float(correct[inside].mean()) if count else None,
                "confidence": float(confidence[inside].mean()) if count else None,
            }
        )
    return curve


def expected_calibration_error(
    probabilities: np.ndarray, targets: np.ndarray, bins: int = 15
) -> float:
    """|accuracy - confidence| averaged over equal-width confidence bins, weighted by count.

    Args:
        probabilities: float (N, C); targets: int class indices (N,).
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = abs(float(correct[inside].mean()) - float(confidence[inside].mean()))
            total += float(inside.mean()) * gap
    return total
