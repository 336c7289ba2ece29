"""Seeded, generated stand-ins for the data sets of Perito's use cases.

Each generator writes files in the layout of the real data set its recipe expects
(`training/recipes/*.yaml`), with a visual signal a network has to learn from the pixels:
no class is told apart by file size, mean brightness or a constant colour alone. The
scenario tests (`tests/scenarios/`) train every recipe on them end to end; the same recipe
runs on the real data with `--set data.root=...`.

    concrete cracks  227x227 grey surfaces cropped from real textures (scikit-image's brick,
                     gravel and grass photographs), half with dark branching crack polylines;
                     the label is the file name's suffix: 00001P.jpg (crack), 00001N.jpg
    car damage       car-like shapes in many colours, one folder per severity (minor,
                     moderate, severe): the extent of scratches and dents on the body
    minerals         ten classes of textured colour blobs listed in a CSV `path,label`
    waste            TRAIN/O, TRAIN/R, TEST/O, TEST/R: organic blobs (peels, leaves) against
                     recyclable containers (bottles, cans, boxes)
    objects          flat shapes on textured backgrounds, one folder per shape: the ResNet-18
                     scenario pre-trains on one set of shapes and fine-tunes on six others

`python -m tests.synthetic KIND OUT [--count N] [--seed S]`, from the repository root, writes one.
The same seed gives the same files (byte for byte with the same Pillow version).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from perito_core.scenes import FINETUNE_SHAPES, PRETRAIN_SHAPES, object_image
from perito_core.scenes import rgb as _rgb
from perito_core.scenes import smooth_noise as _smooth_noise
from perito_core.scenes import to_image as _to_image

Rng = np.random.Generator
RGB = tuple[int, int, int]

CRACK_SIZE = 227
# scikit-image's real texture photographs the crack surfaces are cropped from.
TEXTURES = ("brick", "gravel", "grass")
CAR_SEVERITIES = ("minor", "moderate", "severe")
# name: (base colour, texture). Classes that share a texture differ in colour, and the
# two yellow ones (pyrite, sulfur) differ in texture only.
MINERALS: dict[str, tuple[RGB, str]] = {
    "amethyst": ((140, 80, 170), "crystalline"),
    "azurite": ((35, 70, 170), "crystalline"),
    "calcite": ((230, 170, 110), "fibrous"),
    "hematite": ((110, 60, 55), "smooth"),
    "malachite": ((40, 150, 80), "banded"),
    "obsidian": ((25, 25, 30), "smooth"),
    "pyrite": ((200, 170, 70), "crystalline"),
    "quartz": ((215, 215, 220), "crystalline"),
    "rhodochrosite": ((220, 110, 140), "banded"),
    "sulfur": ((215, 195, 50), "speckled"),
}
WASTE_FOLDERS = {"O": "organic", "R": "recyclable"}


def _jitter(rng: Rng, colour: Sequence[float], amount: float) -> RGB:
    return _rgb(np.asarray(colour, dtype=np.float64) + rng.normal(0, amount, 3))


def _blob_mask(rng: Rng, size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """A boolean mask of an irregular, smooth-edged blob (radius varying with the angle)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = np.arctan2(y - centre[1], x - centre[0])
    wobble = np.ones_like(angle)
    for harmonic in (2, 3, 5):
        wobble += rng.uniform(0.04, 0.14) * np.sin(harmonic * angle + rng.uniform(0, 2 * np.pi))
    distance = np.hypot(x - centre[0], y - centre[1])
    mask: np.ndarray = distance <= radius * wobble
    return mask


# Concrete cracks ---------------------------------------------------------------------------


def _textures() -> list[np.ndarray]:
    """The real surface photographs that ship with scikit-image (512x512 grey each).

    Read from the package's data folder with Pillow: `skimage.data.brick()` would give the same
    pixels but imports scikit-image's I/O stack (SciPy and more), many seconds on a busy CPU.
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed: pip install scikit-image")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    textures = []
    for name in TEXTURES:
        with Image.open(folder / f"{name}.png") as image:
            textures.append(np.asarray(image.convert("L"), dtype=np.float64))
    return textures


def _surface(rng: Rng, textures: list[np.ndarray], size: int) -> np.ndarray:
    """A grey concrete-like surface: a random crop of a real texture, rescaled, flipped and
    given a random brightness, contrast and faint lighting gradient."""
    texture = textures[int(rng.integers(len(textures)))]
    crop = int(rng.integers(size, min(texture.shape) + 1))
    top, left = (int(rng.integers(0, texture.shape[i] - crop + 1)) for i in (0, 1))
    patch = texture[top : top + crop, left : left + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = np.rot90(patch, int(rng.integers(4)))
    resized = Image.fromarray(patch.astype(np.uint8)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    pixels = np.asarray(resized, dtype=np.float64)
    # Concrete is grey and not very contrasty: pull the texture towards a mid-grey level.
    level = rng.uniform(120, 190)
    contrast = rng.uniform(0.25, 0.55)
    pixels = level + (pixels - pixels.mean()) * contrast
    y, x = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    lit: np.ndarray = pixels + rng.uniform(0, 25) * (np.cos(angle) * x + np.sin(angle) * y - 0.5)
    return lit


def _crack_paths(rng: Rng, size: int) -> list[tuple[list[tuple[float, float]], float]]:
    """Branching polylines across the surface, each with its stroke width."""
    paths: list[tuple[list[tuple[float, float]], float]] = []
    # Start on one edge and wander across, so a crack always spans most of the image.
    edge = int(rng.integers(4))
    position = rng.uniform(0.15, 0.85) * size
    start = [(position, 0.0), (size - 1.0, position), (position, size - 1.0), (0.0, position)][edge]
    heading = [math.pi / 2, math.pi, -math.pi / 2, 0.0][edge] + rng.normal(0, 0.4)
    pending = [(start, heading, rng.uniform(3.5, 6.0), int(rng.integers(28, 45)))]
    while pending and len(paths) < 6:
        (x, y), direction, width, steps = pending.pop()
        points = [(x, y)]
        for _ in range(steps):
            direction += rng.normal(0, 0.35)
            length = rng.uniform(4, 9)
            x, y = x + length * math.cos(direction), y + length * math.sin(direction)
            points.append((x, y))
            if not (0 <= x < size and 0 <= y < size):
                break
            if width > 1.5 and rng.random() < 0.06:
                branch = direction + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
                pending.append(((x, y), branch, width * 0.6, int(rng.integers(6, 18))))
        paths.append((points, width))
    return paths


def crack_image(
    rng: Rng, textures: list[np.ndarray], cracked: bool, size: int = CRACK_SIZE
) -> Image.Image:
    """One grey surface, with a dark branching crack when `cracked`.

    Both kinds get dark stains (blotches, not lines), so darkness alone does not tell a
    crack; what does is a thin, long, dark, branching line.
    """
    image = _to_image(_surface(rng, textures, size)).convert("L")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(4, 18, 2)
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=int(rng.uniform(70, 120)))
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    if cracked:
        draw = ImageDraw.Draw(image)
        for points, width in _crack_paths(rng, size):
            shade = int(rng.uniform(15, 60))
            draw.line(points, fill=shade, width=max(1, round(width)), joint="curve")
        image = image.filter(ImageFilter.GaussianBlur(0.6))
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, 4, (size, size))
    return _to_image(noisy)


def write_concrete_cracks(
    root: Path, count: int, *, seed: int = 0, start: int = 1, size: int = CRACK_SIZE
) -> Path:
    """`count` surfaces into `root`, half cracked: `00001P.jpg` (crack), `00002N.jpg` (none).

    `start` numbers the first file, so a held-out set can follow a training set's numbers.
    """
    rng = np.random.default_rng(seed)
    textures = _textures()
    root.mkdir(parents=True, exist_ok=True)
    for number in range(start, start + count):
        cracked = number % 2 == 1
        image = crack_image(rng, textures, cracked, size)
        image.save(root / f"{number:05d}{'P' if cracked else 'N'}.jpg", quality=90)
    return root


# Car damage --------------------------------------------------------------------------------


def car_image(rng: Rng, severity: int, size: int = 128) -> Image.Image:
    """A car-like shape (body, cabin, wheels) with damage of the given severity (0, 1, 2).

    Severity is the extent of the damage: minor is one or two short scratches, moderate
    several scratches and a dent or two, severe long scratches and large dents over much of
    the body. Colour, position, size and background vary freely.
    """
    ground = rng.uniform(60, 200)
    sky = np.clip(ground + rng.normal(30, 20), 0, 255)
    column = np.linspace(sky, ground, size)[:, None, None] * np.ones((1, size, 3))
    background = column + rng.normal(0, 6, (size, size, 3))
    image = _to_image(background)
    draw = ImageDraw.Draw(image)
    scale = rng.uniform(0.75, 1.0)
    width, height = size * 0.8 * scale, size * 0.28 * scale
    left = rng.uniform(0.02 * size, size - width - 0.02 * size)
    top = rng.uniform(0.4 * size, 0.62 * size)
    body = _rgb(rng.uniform(20, 235, 3))
    draw.rounded_rectangle((left, top, left + width, top + height), radius=height * 0.3, fill=body)
    cabin_left, cabin_right = (
        left + width * rng.uniform(0.2, 0.3),
        left + width * rng.uniform(0.65, 0.78),
    )
    cabin_top = top - height * rng.uniform(0.6, 0.8)
    draw.polygon(
        [
            (cabin_left, top),
            (cabin_left + width * 0.08, cabin_top),
            (cabin_right - width * 0.06, cabin_top),
            (cabin_right, top),
        ],
        fill=body,
    )
    glass = _jitter(rng, (150, 180, 200), 15)
    inset = height * 0.12
    draw.polygon(
        [
            (cabin_left + inset, top - inset * 0.5),
            (cabin_left + width * 0.08 + inset * 0.6, cabin_top + inset),
            (cabin_right - width * 0.06 - inset * 0.6, cabin_top + inset),
            (cabin_right - inset, top - inset * 0.5),
        ],
        fill=glass,
    )
    wheel = height * 0.42
    for centre in (left + width * 0.2, left + width * 0.8):
        draw.ellipse(
            (centre - wheel, top + height - wheel, centre + wheel, top + height + wheel),
            fill=(20, 20, 20),
        )
        hub = wheel * 0.45
        draw.ellipse(
            (centre - hub, top + height - hub, centre + hub, top + height + hub),
            fill=(150, 150, 150),
        )

    def body_point() -> tuple[float, float]:
        return (
            float(rng.uniform(left + width * 0.05, left + width * 0.95)),
            float(rng.uniform(top + height * 0.1, top + height * 0.75)),
        )

    scratches, dents, extent = (
        [(1, 2), (3, 5), (6, 9)][severity],
        [(0, 0), (1, 2), (3, 5)][severity],
        [0.12, 0.22, 0.38][severity],
    )
    dark = _rgb(np.asarray(body) * 0.45)
    for _ in range(int(rng.integers(dents[0], dents[1] + 1))):
        x, y = body_point()
        rx, ry = width * extent * rng.uniform(0.3, 0.5), height * rng.uniform(0.2, 0.4)
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=dark)
        draw.arc((x - rx, y - ry, x + rx, y + ry), 200, 340, fill=(235, 235, 235), width=2)
    for _ in range(int(rng.integers(scratches[0], scratches[1] + 1))):
        x, y = body_point()
        length = width * extent * rng.uniform(0.6, 1.2)
        angle = rng.normal(0, 0.35)
        points = [(x, y)]
        for _ in range(4):
            angle += rng.normal(0, 0.2)
            x, y = x + length / 4 * math.cos(angle), y + length / 4 * math.sin(angle)
            points.append((x, y))
        shade = int(rng.uniform(200, 250)) if sum(body) < 450 else int(rng.uniform(30, 70))
        draw.line(points, fill=(shade, shade, shade), width=2)
    return image


def write_car_damage(root: Path, per_class: int, *, seed: int = 0, size: int = 128) -> Path:
    """`root/{minor,moderate,severe}/NNNN.jpg`, `per_class` images each."""
    rng = np.random.default_rng(seed)
    for severity, name in enumerate(CAR_SEVERITIES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            car_image(rng, severity, size).save(folder / f"{name}-{n:04d}.jpg", quality=92)
    return root


# Minerals ----------------------------------------------------------------------------------


def _mineral_texture(rng: Rng, kind: str, size: int) -> np.ndarray:
    """A brightness factor per pixel (around 1) with the look of `kind`."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "banded":
        centre = rng.uniform(0, size, 2)
        radius = np.hypot(x - centre[0], y - centre[1]) + 6 * _smooth_noise(rng, size, 4)
        bands: np.ndarray = 0.75 + 0.35 * (np.sin(radius / rng.uniform(1.6, 2.6)) > 0)
        return bands
    if kind == "crystalline":
        seeds = rng.uniform(0, size, (14, 2))
        distance = np.hypot(x[..., None] - seeds[:, 0], y[..., None] - seeds[:, 1])
        facets: np.ndarray = rng.uniform(0.6, 1.35, 14)[distance.argmin(axis=2)]
        return facets
    if kind == "fibrous":
        angle = rng.uniform(0, np.pi)
        along = x * np.cos(angle) + y * np.sin(angle)
        fibres: np.ndarray = 0.85 + 0.2 * np.sin(
            along * rng.uniform(1.8, 2.4) + 3 * _smooth_noise(rng, size, 3)
        )
        return fibres
    if kind == "speckled":
        return np.where(rng.random((size, size)) < 0.12, rng.uniform(0.4, 0.6), 1.0) * (
            0.9 + 0.2 * _smooth_noise(rng, size, 5)
        )
    # smooth and glossy: a soft gradient and one bright highlight
    centre = rng.uniform(0.3 * size, 0.7 * size, 2)
    shine = np.exp(-(np.hypot(x - centre[0], y - centre[1]) ** 2) / (2 * (size * 0.08) ** 2))
    shaded: np.ndarray = 0.85 + 0.25 * _smooth_noise(rng, size, 2) + 1.5 * shine
    return shaded


def mineral_image(rng: Rng, name: str, size: int = 64) -> Image.Image:
    """A blob of mineral `name` (`MINERALS`) on a neutral background."""
    colour, texture = MINERALS[name]
    background = rng.uniform(90, 230) + rng.normal(0, 12, 3)
    pixels = np.ones((size, size, 3)) * background + rng.normal(0, 5, (size, size, 3))
    centre = (rng.uniform(0.35, 0.65) * size, rng.uniform(0.35, 0.65) * size)
    mask = _blob_mask(rng, size, centre, rng.uniform(0.25, 0.38) * size)
    base = np.asarray(_jitter(rng, colour, 12), dtype=np.float64)
    mineral = base * _mineral_texture(rng, texture, size)[..., None]
    pixels[mask] = mineral[mask]
    return _to_image(pixels).filter(ImageFilter.GaussianBlur(0.4))


def write_minerals(root: Path, per_class: int, *, seed: int = 0, size: int = 64) -> Path:
    """`root/images/NAME-NNNN.jpg` and `root/minerals.csv` (`path,label`, paths relative to
    the CSV); returns the CSV's path."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(per_class):
        for name in MINERALS:
            path = f"images/{name}-{n:04d}.jpg"
            mineral_image(rng, name, size).save(root / path, quality=92)
            rows.append((path, name))
    manifest = root / "minerals.csv"
    with manifest.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return manifest


# Waste -------------------------------------------------------------------------------------


def _organic(rng: Rng, pixels: np.ndarray, size: int) -> None:
    """Peels, leaves and scraps: soft irregular blobs in mottled browns, greens, oranges."""
    palette = [(120, 80, 40), (90, 130, 50), (210, 140, 40), (160, 110, 60), (200, 190, 90)]
    for _ in range(int(rng.integers(2, 5))):
        centre = (rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size)
        mask = _blob_mask(rng, size, centre, rng.uniform(0.12, 0.28) * size)
        colour = np.asarray(_jitter(rng, palette[int(rng.integers(len(palette)))], 18), float)
        mottled = colour * (0.7 + 0.5 * _smooth_noise(rng, size, 6))[..., None]
        pixels[mask] = mottled[mask]


def _recyclable(rng: Rng, image: Image.Image, size: int) -> None:
    """Bottles, cans and boxes: straight edges, flat or metallic colours, a label band."""
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 3))):
        kind = int(rng.integers(3))
        w, h = rng.uniform(0.18, 0.32) * size, rng.uniform(0.4, 0.7) * size
        left, top = rng.uniform(0, size - w), rng.uniform(0, size - h)
        colour = _rgb(rng.uniform(30, 240, 3))
        if kind == 0:  # bottle: body and neck
            neck = w * 0.35
            draw.rectangle(
                (left + (w - neck) / 2, top, left + (w + neck) / 2, top + h * 0.3), fill=colour
            )
            draw.rounded_rectangle(
                (left, top + h * 0.25, left + w, top + h), radius=w * 0.2, fill=colour
            )
        elif kind == 1:  # can: metallic bands
            for i in range(int(w)):
                shade = 140 + 90 * math.sin(math.pi * i / max(w, 1.0))
                draw.line(
                    (left + i, top, left + i, top + h * 0.8),
                    fill=_jitter(rng, (shade, shade, shade), 4),
                )
            draw.rectangle((left, top, left + w, top + h * 0.08), fill=(90, 90, 90))
        else:  # flattened box
            w = w * 1.8
            draw.rectangle((left, top, left + w, top + h * 0.7), fill=colour)
            draw.line((left, top + h * 0.35, left + w, top + h * 0.35), fill=(60, 60, 60), width=1)
        band = _rgb(rng.uniform(0, 255, 3))
        draw.rectangle((left, top + h * 0.45, left + w, top + h * 0.6), fill=band)


def waste_image(rng: Rng, recyclable: bool, size: int = 96) -> Image.Image:
    """Organic scraps or recyclable containers on a plain, slightly noisy floor."""
    floor = rng.uniform(70, 210) + rng.normal(0, 10, 3)
    pixels = np.ones((size, size, 3)) * floor + rng.normal(0, 6, (size, size, 3))
    if recyclable:
        image = _to_image(pixels)
        _recyclable(rng, image, size)
        return image
    _organic(rng, pixels, size)
    return _to_image(pixels)


def write_waste(
    root: Path, train_per_class: int, test_per_class: int, *, seed: int = 0, size: int = 96
) -> Path:
    """`root/TRAIN/{O,R}/` and `root/TEST/{O,R}/`: the layout of the public waste data set."""
    rng = np.random.default_rng(seed)
    for split, count in (("TRAIN", train_per_class), ("TEST", test_per_class)):
        for letter in WASTE_FOLDERS:
            folder = root / split / letter
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                image = waste_image(rng, letter == "R", size)
                image.save(folder / f"{letter}_{n:04d}.jpg", quality=90)
    return root


# Objects (ResNet-18 pre-training and fine-tuning) -------------------------------------------


def write_objects(
    root: Path, shapes: Sequence[str], per_class: int, *, seed: int = 0, size: int = 64
) -> Path:
    """`root/<shape>/NNNN.png`, `per_class` images of each shape."""
    rng = np.random.default_rng(seed)
    for shape in shapes:
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            object_image(rng, shape, size).save(folder / f"{shape}-{n:04d}.png")
    return root


# Command line ------------------------------------------------------------------------------

WRITERS: dict[str, Callable[[Path, int, int], Path]] = {
    "concrete-cracks": lambda out, count, seed: write_concrete_cracks(out, count, seed=seed),
    "car-damage": lambda out, count, seed: write_car_damage(out, count, seed=seed),
    "minerals": lambda out, count, seed: write_minerals(out, count, seed=seed),
    "waste": lambda out, count, seed: write_waste(out, count, max(1, count // 4), seed=seed),
    "objects": lambda out, count, seed: write_objects(out, FINETUNE_SHAPES, count, seed=seed),
    "objects-pretrain": lambda out, count, seed: write_objects(
        out, PRETRAIN_SHAPES, count, seed=seed
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a generated data set in the layout of a Perito recipe."
    )
    parser.add_argument("kind", choices=sorted(WRITERS))
    parser.add_argument("out", type=Path, help="folder to write into")
    parser.add_argument(
        "--count", type=int, default=100, help="images (concrete-cracks) or images per class"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    written = WRITERS[args.kind](args.out, args.count, args.seed)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
