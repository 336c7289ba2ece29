"""What a model's probabilities say about one image: the top-k classes, the margin between
the first two, the normalised entropy and whether the top-1 is under the threshold.

Numpy only (and the contract's `Prediction`, so that what the server answers and what the
SDK returns are one type), whichever engine computed the probabilities (TorchScript, OpenVINO,
ONNX Runtime): the server's `Classify`, the Open Inference Protocol door and the worker
summarise each image with it.

Probabilities holding NaN or infinity (a graph dividing by a zero norm on an all-black photo)
are no answer: every door finds such images with `not_finite` and fails them with the reason
`MODEL_OUTPUT_NOT_FINITE` instead, and `summarize` refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# One class and its probability: the contract's type, which the SDK returns too.
from perito.v1.vocabulary import Prediction

# The reason an image whose model output is not finite fails with (`PeritoError.reason`, and
# the prefix of a bulk item's error), and what it says.
MODEL_OUTPUT_NOT_FINITE = "MODEL_OUTPUT_NOT_FINITE"
NOT_FINITE_MESSAGE = (
    "the model's output for this image holds NaN or infinity, so it has no answer "
    "(the model is at fault, not the image)"
)


@dataclass(frozen=True)
class Classification:
    """Top-k classes and how sure the model is about the top one."""

    predictions: list[Prediction]
    margin: float
    normalized_entropy: float
    uncertain: bool


def not_finite(probabilities: Sequence[np.ndarray]) -> list[int]:
    """The positions of the images whose probabilities hold NaN, +inf or -inf.

    Args:
        probabilities: one float array [C] per image (or a float array [N, C]).

    Returns:
        Their indexes, in order; empty when every value is finite.
    """
    return [i for i, row in enumerate(probabilities) if not np.isfinite(row).all()]


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
        ValueError: a probability is NaN or infinite (`not_finite` finds these first).
    """
    if not np.isfinite(probabilities).all():
        raise ValueError(f"{MODEL_OUTPUT_NOT_FINITE}: {NOT_FINITE_MESSAGE}")
    k = max(1, min(top_k, len(labels)))
    order = np.argsort(-probabilities, kind="stable")  # one sort: the top-k and the margin
    predictions = [Prediction(labels[i], int(i), float(probabilities[i])) for i in order[:k]]
    top = float(probabilities[order[0]])
    margin = top - float(probabilities[order[1]]) if len(order) > 1 else 1.0
    clipped = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    entropy = float(-(clipped * np.log(clipped)).sum() / math.log(len(labels)))
    uncertain = threshold is not None and threshold > 0 and top < threshold
    return Classification(predictions, margin, min(max(entropy, 0.0), 1.0), uncertain)
