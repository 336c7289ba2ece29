"""Every registered architecture exports to TorchScript that matches the eager module."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from perito_training.architectures import ARCHITECTURES
from perito_training.config import ModelConfig, TrainConfig
from perito_training.evaluation import load_module
from perito_training.export import ImageClassifier, save_torchscript
from perito_training.trainer import build_model, lr_factor, schedule_position


def _config(architecture: str, **model: object) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "name": "export-test",
            "data": {"kind": "fashion_mnist"},
            "model": {"architecture": architecture, "input_size": 64, **model},
        }
    )


def _weights_file(tmp_path: Path) -> Path:
    """A torchvision-format ResNet-18 state dict (random: no real weights exist offline)."""
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    return path


def export_untrained(
    architecture: str, folder: Path, temperature: float
) -> tuple[ImageClassifier, TrainConfig, Path]:
    """An untrained three-class `architecture` (seed 0; ResNet-18 from a random weights file
    in `folder`) with `temperature`, exported to `folder/model.pt`: the eager module, its
    config and the file."""
    extra = {"weights": _weights_file(folder)} if architecture == "resnet18" else {}
    config = _config(architecture, **extra)
    torch.manual_seed(0)
    model = build_model(config, num_classes=3).eval()
    model.temperature.fill_(temperature)
    path = folder / "model.pt"
    save_torchscript(model, path)
    return model, config, path


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_scripted_and_eager_outputs_match(architecture: str, tmp_path: Path) -> None:
    model, _, path = export_untrained(architecture, tmp_path, temperature=1.7)
    exported = load_module(path)
    for size in (64, 97):  # the input size, and one the module must resize itself
        images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
        with torch.no_grad():
            eager, scripted = model(images), exported(images)
        assert scripted.shape == (4, 3)
        torch.testing.assert_close(scripted, eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scripted.sum(1), torch.ones(4))


def test_resnet18_refuses_weights_of_another_network(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="does not fit ResNet-18"):
        build_model(_config("resnet18", weights=path), num_classes=2)


def test_efficientnet_lite0_starts_from_the_imagenet_weights() -> None:
    from perito_training.pretrained import efficientnet_lite0_imagenet

    imagenet, _ = efficientnet_lite0_imagenet()
    model = build_model(_config("efficientnet_lite0"), num_classes=2)
    stem = model.network.conv_stem.weight  # type: ignore[union-attr]
    torch.testing.assert_close(stem, imagenet.conv_stem.weight)  # type: ignore[union-attr,arg-type]
    assert model.network.classifier.out_features == 2  # type: ignore[union-attr]


def test_schedules_warm_up_and_decay_per_step() -> None:
    config = _config("cnn4").model_copy(deep=True)
    config.train.epochs = 10
    config.schedule.name = "cosine"
    config.schedule.warmup_epochs = 1
    factors = [lr_factor(config, step, steps_per_epoch=10) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] < 0.01
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    config.schedule.name = "step"
    config.schedule.warmup_epochs = 0
    config.schedule.step_size, config.schedule.gamma = 4, 0.1
    assert [lr_factor(config, e * 10, 10) for e in (0, 3, 4, 8)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.01]
    )
    config.schedule.name = "onecycle"
    onecycle = [lr_factor(config, step, 10) for step in range(100)]
    assert onecycle[0] == pytest.approx(1 / 25) and max(onecycle) == pytest.approx(1.0, abs=1e-3)
    assert onecycle[-1] < 0.01


def test_under_a_time_limit_the_schedule_follows_whichever_limit_ends_first() -> None:
    """2 epochs done in 4 s of an 18.75-minute limit: the schedule followed the time alone and
    never left its starting rate (one-cycle at lr/25; the model trained at a twentieth of its
    peak). It follows the further of the two: it ends where training stops."""
    config = _config("cnn4").model_copy(deep=True)
    config.train.epochs, config.schedule.name = 2, "onecycle"
    total = 2 * 10
    # The epochs end first: 4 s of 1,125 s used at the last step.
    positions = [schedule_position(step, 4 / 1125 * step / total, total) for step in range(total)]
    assert positions == [float(step) for step in range(total)]
    factors = [lr_factor(config, position, 10) for position in positions]
    assert max(factors) == pytest.approx(1.0, abs=0.05) and factors[-1] < 0.05
    # The time ends first: half the time used after a tenth of the steps.
    assert schedule_position(2, 0.5, total) == 10.0
    assert schedule_position(5, None, total) == 5.0


def test_model_config_defaults_follow_the_imagenet_convention() -> None:
    assert ModelConfig(architecture="cnn4", input_size=224).resolved_resize_size() == 256
    squash = ModelConfig(architecture="cnn4", input_size=28, resize_mode="squash")
    assert squash.resolved_resize_size() == 28


def test_resnet8_takes_its_stage_widths_from_the_config() -> None:
    default = build_model(_config("resnet8"), num_classes=10)
    wide = build_model(_config("resnet8", widths=[16, 24, 48, 96]), num_classes=10)
    assert default.network.head[-1].in_features == 128  # type: ignore[index,union-attr]
    assert wide.network.head[-1].in_features == 96  # type: ignore[index,union-attr]
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    assert wide.eval()(images).shape == (2, 10)


def test_test_time_flip_is_inside_the_exported_model(tmp_path: Path) -> None:
    """Evaluation and serving both average each image with its mirror image; training does
    not. The exported module gives a picture and its mirror image the same probabilities, and
    so does the network alone (what compiled forms convert)."""
    torch.manual_seed(0)
    model = build_model(_config("resnet8", test_time_flip=True), num_classes=4).eval()
    plain = build_model(_config("resnet8"), num_classes=4).eval()
    plain.load_state_dict(model.state_dict())  # same weights, same state dict keys
    path = tmp_path / "model.pt"
    save_torchscript(model, path)
    exported = load_module(path)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        served, mirrored = exported(images), exported(images.flip(3))
        by_hand = torch.softmax((plain.logits(images) + plain.logits(images.flip(3))) / 2, dim=1)
        torch.testing.assert_close(served, model(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(served, by_hand, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mirrored, served, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain(images), served, atol=1e-4)
        x = torch.rand(3, 3, 28, 28)
        torch.testing.assert_close(model.network(x), model.network(x.flip(3)))
    model.train()
    assert model.logits(images).shape == (3, 4)  # one pass: no averaging while training
    with pytest.raises(ValueError, match="test_time_flip is for cnn4, cnn5 and resnet8"):
        build_model(_config("efficientnet_lite0", test_time_flip=True), num_classes=2)


def test_random_erasing_blacks_out_a_rectangle_of_uint8_images() -> None:
    from perito_training.config import AugmentConfig
    from perito_training.trainer import augmentation

    transform = augmentation(AugmentConfig(hflip=False, random_erasing=1.0), 28)
    assert transform is not None
    torch.manual_seed(0)
    image = torch.full((3, 28, 28), 200, dtype=torch.uint8)
    erased = transform(image)
    assert erased.dtype == torch.uint8 and erased.shape == image.shape
    black = (erased == 0).all(0)
    assert 0.02 * 28 * 28 <= int(black.sum()) <= 0.34 * 28 * 28
    rows, cols = black.any(1).nonzero(), black.any(0).nonzero()
    assert int(black.sum()) == len(rows) * len(cols)  # one rectangle
    assert int(image.min()) == 200  # the cached original is untouched
