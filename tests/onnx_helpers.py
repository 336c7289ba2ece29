"""Keras-shaped networks built in torch and exported to ONNX, for the ONNX model tests.

Keras models take NHWC batches and leave normalisation to the input pipeline (`rescale=1/255`,
or `preprocess_input`); the two use cases Perito was founded on were such models: a waste
classifier (organic / recyclable, one sigmoid unit on [0, 1] pixels) and a minerals classifier
(10 classes, softmax). These are built in torch with the same contract, normalisation outside
the graph, and exported with `torch.onnx.export`, as a Keras user's `tf2onnx` would give. Graphs
of several outputs too: an auxiliary head before the class scores, and a converter's
`[label, probabilities]` (sklearn-onnx with `zipmap=False`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from perito_core.models.engines.onnxruntime import export_onnx as compile_export_onnx
from tests.helpers import conv_layers

WASTE_LABELS = ["organic", "recyclable"]
MINERALS_LABELS = [
    "biotite",
    "bornite",
    "chrysocolla",
    "malachite",
    "muscovite",
    "pyrite",
    "quartz",
    "calcite",
    "fluorite",
    "hematite",
]
# Keras' Caffe-style `preprocess_input` (ResNet50, VGG): BGR, mean subtracted, no scaling.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class KerasShaped(nn.Module):
    """NHWC in, a small CNN inside (channels first, as torch wants), `head` out."""

    def __init__(self, units: int, head: nn.Module, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(*conv_layers(3, 8, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dense = nn.Linear(16, units)
        # Spread the outputs, so that a wrong normalisation shows in the probabilities.
        with torch.no_grad():
            self.dense.weight.mul_(8.0)
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2)
        output: torch.Tensor = self.head(self.dense(self.features(x)))
        return output


class NchwLogits(nn.Module):
    """A torchvision-shaped network: NCHW in, logits out (no softmax)."""

    def __init__(self, classes: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.network = nn.Sequential(
            *conv_layers(3, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images) * 4.0  # type: ignore[no-any-return]


class AuxiliaryFirst(nn.Module):
    """NHWC float32 in [0, 1]; two (N, classes) heads out, an auxiliary one first: `aux` is the
    softmax of the negated logits, so its top-1 is never the class scores' top-1 and serving
    the wrong head shows in every answer."""

    def __init__(self, classes: int, seed: int) -> None:
        super().__init__()
        self.network = KerasShaped(classes, nn.Identity(), seed)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.network(images)
        return torch.softmax(-logits, dim=1), torch.softmax(logits, dim=1)


class LabelAndProbabilities(nn.Module):
    """NHWC float32 in [0, 1]; what converters give (sklearn-onnx with `zipmap=False`): the
    int64 top-1 label (N,) first, then the probabilities (N, classes)."""

    def __init__(self, classes: int, seed: int) -> None:
        super().__init__()
        self.network = KerasShaped(classes, nn.Softmax(dim=1), seed)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = self.network(images)
        return probabilities.argmax(dim=1), probabilities


def export_onnx(
    network: nn.Module,
    example_shape: tuple[int, ...],
    path: Path,
    *,
    dtype: torch.dtype = torch.float32,
    dynamic_batch: bool = True,
    output_names: Sequence[str] = ("output",),
) -> Path:
    """The network in eval mode as ONNX (`perito_core.models.engines.onnxruntime.export_onnx`:
    `input` in, `output_names` out), exported on zeros of `example_shape`."""
    example = torch.zeros(example_shape, dtype=dtype)
    return compile_export_onnx(
        network.eval(), example, path, dynamic_batch=dynamic_batch, output_name=output_names
    )


def waste_model(path: Path, size: int) -> Path:
    """Organic / recyclable: NHWC float32 in [0, 1] (`rescale=1/255`), one sigmoid unit."""
    return export_onnx(KerasShaped(1, nn.Sigmoid(), seed=1), (1, size, size, 3), path)


def minerals_model(path: Path, size: int) -> Path:
    """10 minerals: NHWC float32, Caffe-style BGR minus the mean, softmax."""
    return export_onnx(KerasShaped(10, nn.Softmax(dim=1), seed=2), (1, size, size, 3), path)


def auxiliary_first_model(path: Path, size: int, classes: int = 3) -> Path:
    """`AuxiliaryFirst`, outputs `aux` then `scores`, both float32 (N, classes)."""
    network = AuxiliaryFirst(classes, seed=4)
    return export_onnx(network, (1, size, size, 3), path, output_names=("aux", "scores"))


def label_and_probabilities_model(path: Path, size: int, classes: int = 3) -> Path:
    """`LabelAndProbabilities`, outputs `label` int64 (N,) then `probabilities` (N, classes)."""
    network = LabelAndProbabilities(classes, seed=5)
    return export_onnx(network, (1, size, size, 3), path, output_names=("label", "probabilities"))


def ort_probabilities(path: Path, tensor: np.ndarray, output: str | None = None) -> np.ndarray:
    """ONNX Runtime's own answer for an input tensor, with a plain default session: the output
    named `output`, else the first."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    names = None if output is None else [output]
    return np.asarray(session.run(names, {name: tensor})[0], dtype=np.float32)


def keras_rescale(images: np.ndarray) -> np.ndarray:
    """What a Keras pipeline with `Rescaling(1/255)` outside the model feeds: NHWC float32."""
    return images.astype(np.float32) / 255.0


def caffe_preprocess(images: np.ndarray) -> np.ndarray:
    """Keras' `preprocess_input(mode="caffe")`: RGB to BGR, minus the ImageNet mean (BGR)."""
    bgr = images[..., ::-1].astype(np.float32)
    return np.ascontiguousarray(bgr - np.asarray(CAFFE_MEAN_BGR, dtype=np.float32))
