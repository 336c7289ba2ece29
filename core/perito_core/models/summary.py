"""What a model's probabilities say about one image: the top-k classes, the margin between
the first two, the normalised entropy and whether the top-1 is under the threshold.

Numpy only (and the contract's `Prediction`, so that what the server answers and what the
SDK returns are one type), whichever engine computed the probabilities (TorchScript, OpenVINO,
ONNX Runtime): the server's `Classify`, the Open Inference Protocol door and the worker
summarise each image with it.

An output that is not a probability distribution is no answer: one holding NaN or infinity
(a graph dividing by a zero norm on an all-black photo: `MODEL_OUTPUT_NOT_FINITE`), or one
with a value outside [0, 1] or values not summing to 1 (a model that misbehaves on some
photos: `MODEL_OUTPUT_NOT_PROBABILITIES`). Every door finds such images with `output_faults`
and fails them with that reason instead of answering, and `summarize` refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# One class and its probability: the contract's type, which the SDK returns too.
from perito.v1.vocabulary import Prediction

# The reasons an image whose model output is no answer fails with (`PeritoError.reason`, and
# the prefix of a bulk item's error), and what each says (`FAULT_MESSAGES`).
MODEL_OUTPUT_NOT_FINITE = "MODEL_OUTPUT_NOT_FINITE"
MODEL_OUTPUT_NOT_PROBABILITIES = "MODEL_OUTPUT_NOT_PROBABILITIES"
# How far an output may stray from a probability distribution (float32 softmax of 1,000
# classes sums to 1 within about 1e-6): each value within [-tol, 1 + tol], the sum within tol
# of 1. The same tolerance as the load-time check of the artifact contract.
PROBABILITY_TOLERANCE = 1e-3
FAULT_MESSAGES = {
    MODEL_OUTPUT_NOT_FINITE: (
        "the model's output for this image holds NaN or infinity, so it has no answer "
        "(the model is at fault, not the image)"
    ),
    MODEL_OUTPUT_NOT_PROBABILITIES: (
        "the model's output for this image is not probabilities (a value outside [0, 1], or "
        "values not summing to 1), so it has no answer (the model is at fault, not the image)"
    ),
}


@dataclass(frozen=True)
class Classification:
    """Top-k classes and how sure the model is about the top one."""

    predictions: list[Prediction]
    margin: float
    normalized_entropy: float
    uncertain: bool


def output_fault(probabilities: np.ndarray) -> str | None:
    """Why one image's output is no answer (`MODEL_OUTPUT_NOT_FINITE` or
    `MODEL_OUTPUT_NOT_PROBABILITIES`), or None when it is a probability distribution over
    the classes (each value in [0, 1] and the sum 1, within `PROBABILITY_TOLERANCE`).

    Args:
        probabilities: float [C].
    """
    if not np.isfinite(probabilities).all():
        return MODEL_OUTPUT_NOT_FINITE
    total = float(probabilities.sum(dtype=np.float64))
    low, high = float(probabilities.min()), float(probabilities.max())
    tolerance = PROBABILITY_TOLERANCE
    if low < -tolerance or high > 1.0 + tolerance or abs(total - 1.0) > tolerance:
        return MODEL_OUTPUT_NOT_PROBABILITIES
    return None


def output_faults(probabilities: Sequence[np.ndarray]) -> dict[int, str]:
    """The images whose output is no answer (`output_fault`), by position, with the reason.

    Args:
        probabilities: one float array [C] per image (or a float array [N, C]).

    Returns:
        position -> reason, in order; empty when every output is an answer.
    """
    faults = {}
    for index, row in enumerate(probabilities):
        fault = output_fault(row)
        if fault is not None:
            faults[index] = fault
    return faults


def summarize(
    probabilities: np.ndarray, labels: list[str], top_k: int, threshold: float | None
) -> Classification:
    """Top-k predictions and uncertainty measures for one image's probabilities.

    Args:
        probabilities: float [C], C = len(labels), each in [0, 1].
        labels: the class names, by index.
        top_k: how many predictions (clipped to [1, C]).
        threshold: a top-1 probability under it marks the image uncertain; None or 0: never.

    Raises:
        ValueError: the output is no answer (`output_fault`, which the doors ask first).
    """
    fault = output_fault(probabilities)
    if fault is not None:
        raise ValueError(f"{fault}: {FAULT_MESSAGES[fault]}")
    k = max(1, min(top_k, len(labels)))
    order = np.argsort(-probabilities, kind="stable")  # one sort: the top-k and the margin
    predictions = [Prediction(labels[i], int(i), float(probabilities[i])) for i in order[:k]]
    top = float(probabilities[order[0]])
    margin = top - float(probabilities[order[1]]) if len(order) > 1 else 1.0
    clipped = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    entropy = float(-(clipped * np.log(clipped)).sum() / math.log(len(labels)))
    uncertain = threshold is not None and threshold > 0 and top < threshold
    return Classification(predictions, margin, min(max(entropy, 0.0), 1.0), uncertain)
