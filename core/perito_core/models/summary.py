"""What a model's probabilities say about one image: the top-k classes, the margin between
the first two, the normalised entropy and whether the top-1 is under the threshold.

Numpy only (and the contract's `Prediction`, so that what the server answers and what the
SDK returns are one type), whichever engine computed the probabilities (TorchScript, OpenVINO,
ONNX Runtime): the server's `Classify`, the Open Inference Protocol door and the worker
summarise each image with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# One class and its probability: the contract's type, which the SDK returns too.
from perito.v1.vocabulary import Prediction


@dataclass(frozen=True)
class Classification:
    """Top-k classes and how sure the model is about the top one."""

    predictions: list[Prediction]
    margin: float
    normalized_entropy: float
    uncertain: bool


def summarize(
    probabilities: np.ndarray, labels: list[str], top_k: int, threshold: float | None
) -> Classification:
    """Top-k predictions and uncertainty measures for one image's probabilities."""
    k = max(1, min(top_k, len(labels)))
    order = np.argsort(-probabilities, kind="stable")[:k]
    predictions = [Prediction(labels[i], int(i), float(probabilities[i])) for i in order]
    ranked = np.sort(probabilities)[::-1]
    margin = float(ranked[0] - ranked[1]) if len(ranked) > 1 else 1.0
    clipped = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    entropy = float(-(clipped * np.log(clipped)).sum() / math.log(len(labels)))
    uncertain = threshold is not None and threshold > 0 and float(ranked[0]) < threshold
    return Classification(predictions, margin, min(max(entropy, 0.0), 1.0), uncertain)
