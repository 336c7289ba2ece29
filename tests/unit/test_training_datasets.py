"""Finding, labelling and splitting training images; unreadable files reported, not fatal."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perito_core.imaging import InputSpec
from perito_training.config import DataConfig
from perito_training.datasets import (
    FASHION_MNIST_DIR,
    DatasetError,
    discover,
    prepare_data,
    stratified_split,
)
from tests.helpers import write_pattern_images

SPEC = InputSpec(height=16, width=16, resize_size=16, resize_mode="squash")


def _image(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (value, value, value)).save(path)
    return path


def test_class_folders_split_stratified_and_seeded(tmp_path: Path) -> None:
    write_pattern_images(tmp_path, classes=("minor", "moderate", "severe"), per_class=20, size=16)
    config = DataConfig(kind="folders", root=tmp_path, val_fraction=0.2, test_fraction=0.2)
    data = prepare_data(config, SPEC)
    assert data.classes == ["minor", "moderate", "severe"]
    for split, share in (("train", 12), ("val", 4), ("test", 4)):
        assert data.splits[split].class_counts() == dict.fromkeys(data.classes, share)
    names = [set(data.splits[s].names) for s in ("train", "val", "test")]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    again = prepare_data(config, SPEC)
    assert again.splits["test"].names == data.splits["test"].names
    assert again.fingerprint == data.fingerprint
    other_seed = prepare_data(config.model_copy(update={"split_seed": 1}), SPEC)
    assert other_seed.splits["test"].names != data.splits["test"].names
    image = data.splits["train"].image(0)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8


def test_given_split_folders_are_kept_in_any_case(tmp_path: Path) -> None:
    for split, count in (("TRAIN", 10), ("TEST", 4)):
        for label in ("O", "R"):
            for n in range(count):
                _image(tmp_path / split / label / f"{n}.png")
    config = DataConfig(
        kind="folders", root=tmp_path, val_fraction=0.2, rename={"O": "organic", "R": "recyclable"}
    )
    data = prepare_data(config, SPEC)
    assert data.classes == ["organic", "recyclable"]
    assert all(name.startswith("TEST/") for name in data.splits["test"].names)
    assert len(data.splits["test"]) == 8
    assert data.splits["val"].class_counts() == {"organic": 2, "recyclable": 2}
    assert data.splits["train"].class_counts() == {"organic": 8, "recyclable": 8}


def test_labels_from_file_name_suffixes(tmp_path: Path) -> None:
    for n in range(6):
        _image(tmp_path / f"{n:05d}P.jpg")
        _image(tmp_path / f"{n:05d}N.jpg")
    _image(tmp_path / "00099X.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    catalog = discover(DataConfig(kind="suffix", root=tmp_path))
    assert catalog.classes == ["positive", "negative"]
    labels = Counter(catalog.classes[e.label] for e in catalog.entries)
    assert labels == {"positive": 6, "negative": 6}
    skipped = dict(catalog.skipped)
    assert "does not end in" in skipped["00099X.jpg"]
    assert "does not end in" in skipped["notes.txt"]  # names carry the labels here


def test_csv_manifest_with_splits_and_an_unknown_label(tmp_path: Path) -> None:
    rows = ["path,label,split"]
    for n in range(8):
        for mineral in ("quartz", "pyrite", "biotite"):
            _image(tmp_path / "images" / f"{mineral}{n}.jpg")
            rows.append(f"images/{mineral}{n}.jpg,{mineral},{'test' if n < 2 else 'train'}")
    rows.append("images/quartz0.jpg,granite,train")
    (tmp_path / "minerals.csv").write_text("\n".join(rows) + "\n")
    classes = ["quartz", "pyrite", "biotite"]
    config = DataConfig(
        kind="csv", csv=tmp_path / "minerals.csv", val_fraction=0.2, classes=classes
    )
    data = prepare_data(config, SPEC)
    assert data.classes == classes
    assert len(data.splits["test"]) == 6
    assert len(data.splits["val"]) + len(data.splits["train"]) == 18
    assert [reason for _, reason in data.skipped] == ["label 'granite' is not a class"]


def test_unreadable_images_are_reported_and_left_out(tmp_path: Path) -> None:
    write_pattern_images(tmp_path, classes=("negative", "positive"), per_class=10, size=16)
    (tmp_path / "positive" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "negative" / "empty.png").write_bytes(b"")
    data = prepare_data(DataConfig(kind="folders", root=tmp_path), SPEC)
    reasons = {u.name: u.reason for u in data.unreadable}
    assert set(reasons) == {"positive/broken.jpg", "negative/empty.png"}
    assert "empty" in reasons["negative/empty.png"]
    assert sum(len(s) for s in data.splits.values()) == 20
    assert data.summary()["unreadable"][0]["reason"]


def test_the_fingerprint_changes_when_an_image_does(tmp_path: Path) -> None:
    write_pattern_images(tmp_path, classes=("a", "b"), per_class=6, size=16)
    config = DataConfig(kind="folders", root=tmp_path)
    before = prepare_data(config, SPEC).fingerprint
    _image(tmp_path / "a" / "a-0000.png", value=3)
    assert prepare_data(config, SPEC).fingerprint != before


def test_one_class_or_no_training_images_is_a_clear_error(tmp_path: Path) -> None:
    write_pattern_images(tmp_path, classes=("only",), per_class=4, size=16)
    with pytest.raises(DatasetError, match="1 class"):
        prepare_data(DataConfig(kind="folders", root=tmp_path), SPEC)
    with pytest.raises(DatasetError, match="not a folder"):
        discover(DataConfig(kind="folders", root=tmp_path / "missing"))


def test_stratified_split_shares_each_class_and_keeps_small_classes_in_every_split() -> None:
    labels = [0] * 100 + [1] * 3
    split = stratified_split(labels, {"test": 0.1, "val": 0.1}, seed=0)
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(103))
    assert Counter(labels[i] for i in split["test"]) == {0: 10, 1: 1}
    assert Counter(labels[i] for i in split["val"]) == {0: 10, 1: 1}


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_has_its_given_train_and_test_splits() -> None:
    catalog = discover(DataConfig(kind="fashion_mnist"))
    assert len(catalog.classes) == 10
    assert Counter(e.split for e in catalog.entries) == {"train": 60_000, "test": 10_000}
    assert catalog.arrays is not None and catalog.arrays.shape == (70_000, 28, 28)
