"""The artifact's forward pass for images already at its input size, as a module that both
tracing (OpenVINO's converter) and scripting (the ONNX exporter, which cannot trace into the
artifact's TorchScript submodules) take.

Kept apart, without `from __future__ import annotations`: TorchScript reads the annotations of
`forward` at run time and does not resolve string annotations.
"""

import torch
from torch import nn


class FixedSizeClassifier(nn.Module):
    """uint8 (N, 3, H, W) images at the contract's size -> float32 (N, classes) probabilities:
    `softmax(network(images * scale + shift) / temperature)`, the artifact's own `network`,
    `scale`, `shift` and `temperature` (`perito_training.export.ImageClassifier`) without its
    resize branch (TorchScript control flow no converter takes)."""

    scale: torch.Tensor
    shift: torch.Tensor
    temperature: torch.Tensor

    def __init__(self, artifact: nn.Module) -> None:
        super().__init__()
        self.network: nn.Module = artifact.network  # type: ignore[assignment]
        for name in ("scale", "shift", "temperature"):
            buffer: torch.Tensor = getattr(artifact, name)
            self.register_buffer(name, buffer.detach().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * self.scale + self.shift
        return torch.softmax(self.network(x) / self.temperature, dim=1)


def fixed_size(module: torch.jit.ScriptModule) -> nn.Module:
    """`FixedSizeClassifier` of an artifact that has `network`, `scale`, `shift` and
    `temperature`; the module itself otherwise (an imported module of another shape)."""
    if all(hasattr(module, a) for a in ("network", "scale", "shift", "temperature")):
        return FixedSizeClassifier(module).eval()
    return module
