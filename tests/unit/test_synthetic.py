"""The scenario data generators: the layouts the recipes read, and the same files per seed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from tests.synthetic import (
    CRACK_SIZE,
    FINETUNE_SHAPES,
    MINERALS,
    PRETRAIN_SHAPES,
    main,
    write_car_damage,
    write_concrete_cracks,
    write_minerals,
    write_objects,
    write_waste,
)


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_crack_photos_are_named_by_suffix_and_reproducible(tmp_path: Path) -> None:
    write_concrete_cracks(tmp_path / "a", 6, seed=3, start=11)
    write_concrete_cracks(tmp_path / "b", 6, seed=3, start=11)
    write_concrete_cracks(tmp_path / "c", 6, seed=4, start=11)
    first = files(tmp_path / "a")
    assert sorted(first) == [f"{n:05d}{'P' if n % 2 else 'N'}.jpg" for n in range(11, 17)]
    assert first == files(tmp_path / "b")
    assert first != files(tmp_path / "c")
    with Image.open(tmp_path / "a" / "00011P.jpg") as image:
        assert image.size == (CRACK_SIZE, CRACK_SIZE) and image.mode == "L"


def test_a_crack_is_a_long_dark_line_that_uncracked_surfaces_lack(tmp_path: Path) -> None:
    write_concrete_cracks(tmp_path, 40, seed=0)

    def darkest_share(name: str) -> float:
        pixels = np.asarray(Image.open(tmp_path / name), dtype=np.float64)
        return float((pixels < 70).mean())

    cracked = [darkest_share(p.name) for p in tmp_path.glob("*P.jpg")]
    plain = [darkest_share(p.name) for p in tmp_path.glob("*N.jpg")]
    assert np.median(cracked) > 2 * max(np.median(plain), 1e-4)


def test_the_other_layouts(tmp_path: Path) -> None:
    write_car_damage(tmp_path / "car", 2, size=48)
    assert sorted(p.name for p in (tmp_path / "car").iterdir()) == ["minor", "moderate", "severe"]
    assert len(list((tmp_path / "car").rglob("*.jpg"))) == 6

    manifest = write_minerals(tmp_path / "minerals", 2, size=32)
    with manifest.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * len(MINERALS) and set(rows[0]) == {"path", "label"}
    assert {row["label"] for row in rows} == set(MINERALS)
    assert all((manifest.parent / row["path"]).is_file() for row in rows)

    write_waste(tmp_path / "waste", 3, 1, size=32)
    for split, count in (("TRAIN", 3), ("TEST", 1)):
        for letter in ("O", "R"):
            assert len(list((tmp_path / "waste" / split / letter).iterdir())) == count

    write_objects(tmp_path / "objects", PRETRAIN_SHAPES + FINETUNE_SHAPES, 1, size=32)
    assert {p.name for p in (tmp_path / "objects").iterdir()} == {
        *PRETRAIN_SHAPES,
        *FINETUNE_SHAPES,
    }
    assert not set(PRETRAIN_SHAPES) & set(FINETUNE_SHAPES)


def test_the_command_line_writes_a_data_set(tmp_path: Path) -> None:
    assert main(["minerals", str(tmp_path), "--count", "1", "--seed", "2"]) == 0
    assert (tmp_path / "minerals.csv").read_text().count("\n") == len(MINERALS) + 1
