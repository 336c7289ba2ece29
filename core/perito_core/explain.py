"""Where in a photo a model looked for its answer, from forward passes of the served form only.

Occlusion sensitivity (Zeiler & Fergus, "Visualizing and Understanding Convolutional
Networks", ECCV 2014, section 4.2): a grey-ish square slides over the model input, and where
hiding the photo lowers the probability of the class explained most is where the model looked.
It needs nothing of the model but its answers, so it works alike for every form a version is
served in (TorchScript, OpenVINO, ONNX Runtime, an imported ONNX graph): the forward passes go
through the same `LoadedModel.predict` (in the server: the same dynamic batcher) as any other
image. Captum's `Occlusion` computes the same thing but on a torch module only, which compiled
and imported forms are not.

The model input (uint8 (H, W, 3), the manifest's input size) is cut into a `grid` x `grid`
lattice of cells; the square hides `window` x `window` cells at a time, filled with the
photo's own mean colour, at every position one cell apart: `(grid - window + 1) ** 2` hidden
inputs, plus the photo itself for the reference probability. A cell's heat is the mean drop of
the class's probability over the positions that hide it, negative drops counted as 0, divided
by the largest cell's (so the hottest cell is 1; every cell is 0 when no position lowers the
probability). The defaults, an 8 x 8 grid and a 2 x 2-cell square, cost 50 forward passes per
image (`Occlusion().passes`).

Numpy and Pillow only.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

METHOD = "occlusion"
# Forward passes run at once by `explain` (the server's batcher makes its own batches).
BATCH_SIZE = 32
# A cell's heat under this (after dividing by the hottest) draws no colour.
_MIN_DROP = 1e-6
# How much of the colour map covers the photo in the overlay, at a cell of heat 1.
OVERLAY_ALPHA = 0.6


@dataclass(frozen=True)
class Occlusion:
    """How an image is occluded: a `grid` x `grid` heat map, hiding `window` x `window`
    cells at a time, one cell apart.

    Raises:
        ValueError: a grid under 2 cells, or a window outside [1, grid).
    """

    grid: int = 8
    window: int = 2

    def __post_init__(self) -> None:
        if self.grid < 2 or not 1 <= self.window < self.grid:
            raise ValueError(f"need grid >= 2 and 1 <= window < grid; got {self}")

    @property
    def positions(self) -> int:
        """Where the square is put along one side: `grid - window + 1`."""
        return self.grid - self.window + 1

    @property
    def passes(self) -> int:
        """Forward passes per image: every position of the square, and the photo itself."""
        return self.positions**2 + 1

    def inputs(self, image: np.ndarray) -> np.ndarray:
        """The images to run: the photo, then the photo hidden at each position, row major.

        Args:
            image: uint8 (H, W, 3), the model's input, H and W at least `grid`.

        Returns:
            uint8 (`passes`, H, W, 3).

        Raises:
            ValueError: not a uint8 (H, W, 3) image of at least `grid` pixels a side.
        """
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"need a uint8 (H, W, 3) image; got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        if min(height, width) < self.grid:
            raise ValueError(f"a {height}x{width} image is smaller than a {self.grid} grid")
        rows, cols = _edges(height, self.grid), _edges(width, self.grid)
        fill = image.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
        batch = np.repeat(image[None], self.passes, axis=0)
        for index, (row, col) in enumerate(self._corners(), start=1):
            top, bottom = rows[row], rows[row + self.window]
            left, right = cols[col], cols[col + self.window]
            batch[index, top:bottom, left:right] = fill
        return batch

    def heat_map(self, probabilities: np.ndarray) -> np.ndarray:
        """The heat of each cell, from the explained class's probability for each input.

        Args:
            probabilities: float (`passes`,), the class's probability for each of `inputs`,
                in their order (the photo's first).

        Returns:
            float32 (grid, grid) in [0, 1], row major from the top left.

        Raises:
            ValueError: not `passes` probabilities, or any not finite.
        """
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.shape != (self.passes,) or not np.isfinite(probabilities).all():
            raise ValueError(f"need {self.passes} finite probabilities; got {probabilities.shape}")
        drops = np.maximum(probabilities[0] - probabilities[1:], 0.0)
        total = np.zeros((self.grid, self.grid))
        count = np.zeros((self.grid, self.grid))
        for drop, (row, col) in zip(drops, self._corners(), strict=True):
            total[row : row + self.window, col : col + self.window] += drop
            count[row : row + self.window, col : col + self.window] += 1
        heat: np.ndarray = total / count
        peak = float(heat.max())
        if peak < _MIN_DROP:
            return np.zeros(heat.shape, dtype=np.float32)
        return (heat / peak).astype(np.float32)

    def _corners(self) -> list[tuple[int, int]]:
        return [(row, col) for row in range(self.positions) for col in range(self.positions)]


def _edges(size: int, cells: int) -> np.ndarray:
    """Pixel offsets of `cells` near-equal cells along `size` pixels: `cells + 1` ints."""
    return np.linspace(0, size, cells + 1).round().astype(int)


def explain(
    predict: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    class_index: int,
    occlusion: Occlusion | None = None,
) -> np.ndarray:
    """The occlusion heat map of `class_index` for one image, run by `predict` directly.

    Args:
        predict: uint8 (N, H, W, 3) -> float32 (N, classes) probabilities: a
            `LoadedModel.predict` (any engine's) or a compiled candidate's.
        image: uint8 (H, W, 3), the model's input.
        class_index: the class explained (usually the top-1).
        occlusion: the grid and window (default 8 x 8, 2 x 2: 50 forward passes).

    Returns:
        float32 (grid, grid) in [0, 1].

    Raises:
        ValueError: as `Occlusion.inputs` and `Occlusion.heat_map`.
    """
    occlusion = occlusion or Occlusion()
    inputs = occlusion.inputs(image)
    scores = np.concatenate(
        [predict(inputs[i : i + BATCH_SIZE]) for i in range(0, len(inputs), BATCH_SIZE)]
    )
    return occlusion.heat_map(scores[:, class_index])


# A blue, cyan, yellow, red colour map (matplotlib's "jet" without its dark ends), 0 to 1.
_COLOURS = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float32)
_STOPS = np.array([0.0, 1 / 3, 2 / 3, 1.0], dtype=np.float32)


def colour(heat: np.ndarray) -> np.ndarray:
    """The colour map: heat in [0, 1] of any shape -> float32 RGB (..., 3), 0 to 255."""
    heat = np.clip(heat, 0.0, 1.0)
    return np.stack(
        [np.interp(heat, _STOPS, _COLOURS[:, channel]) for channel in range(3)], axis=-1
    ).astype(np.float32)


def overlay_png(image: np.ndarray, heat: np.ndarray) -> bytes:
    """The photo with the heat map over it, as PNG bytes of the photo's size.

    The grid is scaled to the photo bilinearly and coloured blue (0) to red (1); the colour
    covers the photo with an opacity of `OVERLAY_ALPHA` times the heat, so that a cold area
    shows the photo nearly as it is.

    Args:
        image: uint8 (H, W, 3), the model's input.
        heat: float (rows, cols) in [0, 1], a heat map.

    Returns:
        An RGB PNG, H x W pixels.
    """
    height, width = image.shape[:2]
    grid = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F")
    scaled = np.asarray(grid.resize((width, height), Image.Resampling.BILINEAR))
    alpha = (OVERLAY_ALPHA * np.clip(scaled, 0.0, 1.0))[..., None]
    blended = image.astype(np.float32) * (1 - alpha) + colour(scaled) * alpha
    out = io.BytesIO()
    Image.fromarray(blended.round().astype(np.uint8), mode="RGB").save(out, format="PNG")
    return out.getvalue()
