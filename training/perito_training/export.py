"""Export a classifier as a self-contained TorchScript artifact.

The exported module honours the artifact contract in `perito_core.models.manifest`: it takes a uint8
RGB batch (N, 3, H, W), resizes it if it is not already at the input size, normalises it, runs
the network and returns class probabilities (N, C), temperature-scaled when calibrated. So
preprocessing travels with the weights and serving cannot drift from training.
"""

# No `from __future__ import annotations`: TorchScript needs the real annotations.
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perito_core.models.manifest import InputContract


class ImageClassifier(nn.Module):
    """uint8 images in, probabilities out.

    Args:
        network: maps a normalised float batch (N, 3, H, W) to logits (N, C).
        contract: the input size and normalisation.
        temperature: logits are divided by it before the softmax (1.0: uncalibrated).
    """

    scale: Tensor
    shift: Tensor
    temperature: Tensor

    def __init__(self, network: nn.Module, contract: InputContract, temperature: float = 1.0):
        super().__init__()
        self.network = network
        mean = contract.mean or (0.0, 0.0, 0.0)
        std = contract.std or (1.0, 1.0, 1.0)
        # Fold /255 and the normalisation into one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer(
            "shift", -torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1)
        )
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.height = contract.height
        self.width = contract.width
        self.resize_size = contract.resize_size
        self.center_crop = contract.resize_mode == "center_crop"

    def forward(self, images: Tensor) -> Tensor:
        return torch.softmax(self.logits(images) / self.temperature, dim=1)

    def logits(self, images: Tensor) -> Tensor:
        """Uncalibrated logits: what training optimises, through the same preprocessing."""
        x = images.float()
        if x.shape[-2] != self.height or x.shape[-1] != self.width:
            x = self._resize(x)
        x = x * self.scale + self.shift
        logits: Tensor = self.network(x)
        return logits

    def _resize(self, x: Tensor) -> Tensor:
        if not self.center_crop:
            return F.interpolate(
                x,
                size=(self.height, self.width),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            ).clamp(0, 255)
        h, w = x.shape[-2], x.shape[-1]
        ratio = float(self.resize_size) / float(min(h, w))
        new_h = max(self.height, int(round(h * ratio)))  # noqa: RUF046 - float in TorchScript
        new_w = max(self.width, int(round(w * ratio)))  # noqa: RUF046 - float in TorchScript
        x = F.interpolate(
            x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )
        top = (new_h - self.height) // 2
        left = (new_w - self.width) // 2
        return x[:, :, top : top + self.height, left : left + self.width].clamp(0, 255)


def export_torchscript(
    network: nn.Module, contract: InputContract, path: Path, *, temperature: float = 1.0
) -> torch.jit.ScriptModule:
    """Wrap `network`, script it and save it to `path`; returns the scripted module."""
    return save_torchscript(ImageClassifier(network, contract, temperature), path)


def save_torchscript(module: ImageClassifier, path: Path) -> torch.jit.ScriptModule:
    """Script a (trained) `ImageClassifier` in eval mode and save it to `path`."""
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated; it is the artifact format (model.pt).
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(module.eval())
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(path))  # type: ignore[no-untyped-call]
    return scripted
