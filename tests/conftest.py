"""Session fixtures: the real EfficientNet-Lite0 artifact, a tiny model, real photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from perito_core.registry import ModelRegistry
from tests.helpers import TINY_INPUT, tiny_network

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def lite0_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet EfficientNet-Lite0 exported as a Perito artifact: model.pt + labels.txt."""
    from perito_training.pretrained import write_efficientnet_lite0

    out = tmp_path_factory.mktemp("lite0")
    write_efficientnet_lite0(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from perito_training.export import export_torchscript

    path = tmp_path_factory.mktemp("tiny") / "model.pt"
    export_torchscript(tiny_network(3), TINY_INPUT, path)
    return path


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real photos from scikit-image and scikit-learn, as JPEG files, by name."""
    from scripts.sample_photos import PHOTOS, write_sample_photos

    paths = write_sample_photos(tmp_path_factory.mktemp("photos"))
    return dict(zip(PHOTOS, paths, strict=True))


def publish_lite0(registry: ModelRegistry, lite0_dir: Path, **kwargs: object) -> str:
    from perito_training.pretrained import EFFICIENTNET_LITE0_INPUT

    labels = (lite0_dir / "labels.txt").read_text().splitlines()
    manifest = registry.publish(
        "imagenet-efficientnet-lite0",
        lite0_dir / "model.pt",
        labels=labels,
        input=EFFICIENTNET_LITE0_INPUT,
        **kwargs,  # type: ignore[arg-type]
    )
    return manifest.version


def publish_tiny(
    registry: ModelRegistry, model_file: Path, name: str = "tiny", **kwargs: object
) -> str:
    manifest = registry.publish(
        name,
        model_file,
        labels=["minor", "moderate", "severe"],
        input=TINY_INPUT,
        **kwargs,  # type: ignore[arg-type]
    )
    return manifest.version
