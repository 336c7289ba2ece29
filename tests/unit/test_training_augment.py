"""Batch augmentation: the per-image transforms of `augmentation`, drawn per image, at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from perito_training.config import AugmentConfig
from perito_training.trainer import BatchAugment, batch_augmentation


def _images(n: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(1, 256, (n, 3, 28, 28), dtype=torch.uint8)


def test_translation_is_a_random_window_of_the_zero_padded_image() -> None:
    images = _images()
    torch.manual_seed(1)
    moved = BatchAugment(2, hflip=False, vflip=False, random_erasing=0.0)(images)
    assert moved.dtype == torch.uint8 and moved.shape == images.shape
    padded = F.pad(images, (2, 2, 2, 2))
    offsets = set()
    for image, out in zip(padded, moved, strict=True):
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(image[:, dy : dy + 28, dx : dx + 28], out)
        ]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 10  # drawn per image
    assert int(images.min()) >= 1  # the input batch is untouched


def test_flips_mirror_about_half_the_images() -> None:
    images = _images(200)
    flipped = BatchAugment(0, hflip=True, vflip=False, random_erasing=0.0)(images)
    mirrored = [torch.equal(out, image.flip(2)) for image, out in zip(images, flipped, strict=True)]
    kept = [torch.equal(out, image) for image, out in zip(images, flipped, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))
    assert 60 < sum(mirrored) < 140
    upside_down = BatchAugment(0, hflip=False, vflip=True, random_erasing=0.0)(images)
    assert all(
        torch.equal(out, image) or torch.equal(out, image.flip(1))
        for image, out in zip(images, upside_down, strict=True)
    )


def test_random_erasing_blacks_out_one_rectangle_of_2_to_33_percent() -> None:
    images = _images()
    erased = BatchAugment(0, hflip=False, vflip=False, random_erasing=1.0)(images)
    areas = []
    for out in erased:
        black = (out == 0).all(0)
        rows, cols = black.any(1).nonzero(), black.any(0).nonzero()
        assert int(black.sum()) == len(rows) * len(cols)  # one rectangle
        assert int((out == 0).sum()) == 3 * int(black.sum())  # nothing else touched
        areas.append(int(black.sum()))
    assert all(0.02 * 784 * 0.8 <= area <= 0.33 * 784 * 1.2 for area in areas)
    assert len(set(areas)) > 10
    half = BatchAugment(0, hflip=False, vflip=False, random_erasing=0.5)(_images(200))
    assert 60 < sum(bool((out == 0).any()) for out in half) < 140


def test_batch_form_only_for_transforms_it_has() -> None:
    assert batch_augmentation(AugmentConfig(hflip=False)) is None  # nothing asked for
    augment = batch_augmentation(AugmentConfig(translate_pixels=2, random_erasing=0.5))
    assert isinstance(augment, BatchAugment)
    assert (augment.translate_pixels, augment.hflip, augment.random_erasing) == (2, True, 0.5)
    # A transform without a batch form: every transform runs per image, in their order.
    assert batch_augmentation(AugmentConfig(translate_pixels=2, rotation_degrees=10)) is None
    assert batch_augmentation(AugmentConfig(color_jitter=0.2)) is None
    assert batch_augmentation(AugmentConfig(crop_scale=(0.5, 1.0))) is None
