"""Generated scenes: flat shapes of any colour, size, place and rotation on textured
backgrounds, seeded.

What the tests' data sets (`tests/synthetic.py`: the ResNet-18 scenario pre-trains on
`PRETRAIN_SHAPES` and fine-tunes on `FINETUNE_SHAPES`) and the accuracy gate's image sets
(`perito_core.models.gate_images`) draw from: the same seed gives the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

Rng = np.random.Generator
RGB = tuple[int, int, int]

# Shapes for the ResNet-18 scenario: it pre-trains on the first four and is fine-tuned on
# the six after them, which it has never seen.
PRETRAIN_SHAPES = ("disc", "square", "triangle", "cross")
FINETUNE_SHAPES = ("star", "ring", "hexagon", "arrow", "crescent", "diamond")
SHAPES = PRETRAIN_SHAPES + FINETUNE_SHAPES


def rgb(colour: np.ndarray) -> RGB:
    """A colour as three ints clipped to 0-255."""
    red, green, blue = (int(c) for c in np.clip(colour, 0, 255))
    return red, green, blue


def to_image(pixels: np.ndarray) -> Image.Image:
    """An RGB (H, W, 3) or grey (H, W) float array as a uint8 Pillow image, clipped."""
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def smooth_noise(rng: Rng, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random `cells` x `cells` grid, bicubically enlarged."""
    grid = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    enlarged = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
    noise: np.ndarray = np.asarray(enlarged, dtype=np.float64) / 255.0
    return noise


def _polygon(
    centre: tuple[float, float], radii: Sequence[float], turn: float
) -> list[tuple[float, float]]:
    step = 2 * math.pi / len(radii)
    return [
        (centre[0] + r * math.cos(turn + i * step), centre[1] + r * math.sin(turn + i * step))
        for i, r in enumerate(radii)
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    centre: tuple[float, float],
    r: float,
    turn: float,
    colour: RGB,
    background: RGB,
) -> None:
    cx, cy = centre
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, fill=colour)
        draw.ellipse((cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55), fill=background)
    elif shape == "crescent":
        draw.ellipse(box, fill=colour)
        dx, dy = r * 0.5 * math.cos(turn), r * 0.5 * math.sin(turn)
        draw.ellipse((cx - r + dx, cy - r + dy, cx + r + dx, cy + r + dy), fill=background)
    elif shape == "square":
        draw.polygon(_polygon(centre, [r] * 4, turn), fill=colour)
    elif shape == "diamond":
        draw.polygon(_polygon(centre, [r, r * 0.55] * 2, turn), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(centre, [r] * 3, turn), fill=colour)
    elif shape == "hexagon":
        draw.polygon(_polygon(centre, [r] * 6, turn), fill=colour)
    elif shape == "star":
        draw.polygon(_polygon(centre, [r, r * 0.4] * 5, turn), fill=colour)
    elif shape == "cross":
        arm = r * 0.32
        for a in (turn, turn + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            ox, oy = -dy * arm, dx * arm
            draw.polygon(
                [
                    (cx - dx * r + ox, cy - dy * r + oy),
                    (cx + dx * r + ox, cy + dy * r + oy),
                    (cx + dx * r - ox, cy + dy * r - oy),
                    (cx - dx * r - ox, cy - dy * r - oy),
                ],
                fill=colour,
            )
    elif shape == "arrow":
        dx, dy = math.cos(turn), math.sin(turn)
        ox, oy = -dy * r * 0.6, dx * r * 0.6
        draw.polygon(
            [(cx + dx * r, cy + dy * r), (cx + ox, cy + oy), (cx - ox, cy - oy)], fill=colour
        )
        sx, sy = -dy * r * 0.22, dx * r * 0.22
        draw.polygon(
            [
                (cx + sx, cy + sy),
                (cx - sx, cy - sy),
                (cx - dx * r - sx, cy - dy * r - sy),
                (cx - dx * r + sx, cy - dy * r + sy),
            ],
            fill=colour,
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")


def object_image(rng: Rng, shape: str, size: int = 64) -> Image.Image:
    """One shape, any colour, size, place and rotation, on a textured background."""
    base = rng.uniform(40, 215, 3)
    texture = (smooth_noise(rng, size, 5) - 0.5)[..., None] * rng.uniform(20, 60)
    pixels = base + texture + rng.normal(0, 5, (size, size, 3))
    image = to_image(pixels)
    colour = rgb(
        np.where(base > 128, base - rng.uniform(70, 120, 3), base + rng.uniform(70, 120, 3))
    )
    r = rng.uniform(0.22, 0.38) * size
    centre = (float(rng.uniform(r, size - r)), float(rng.uniform(r, size - r)))
    _draw_shape(
        ImageDraw.Draw(image),
        shape,
        centre,
        r,
        float(rng.uniform(0, 2 * math.pi)),
        colour,
        rgb(base),
    )
    return image
