"""Occlusion explanations (perito_core.explain) over a model whose answer is decided by a
patch: numpy only, the model a function of the pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from perito_core.explain import Occlusion, explain, overlay_png


def patch_model(top: int, left: int, size: int) -> object:
    """Probability of class 1 = the share of the `size` square at (top, left) that is bright
    red; class 0 the rest: hiding the square (and only the square) lowers class 1."""

    def predict(images: np.ndarray) -> np.ndarray:
        square = images[:, top : top + size, left : left + size].astype(np.float32)
        red = ((square[..., 0] > 200) & (square[..., 1] < 60)).mean(axis=(1, 2))
        return np.stack([1 - red, red], axis=1).astype(np.float32)

    return predict


def photo_with_patch(top: int, left: int, size: int, side: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(60, 140, (side, side, 3), dtype=np.uint8)
    image[top : top + size, left : left + size] = (255, 0, 0)
    return image


@pytest.mark.parametrize(
    ("top", "left", "cell"), [(0, 0, (0, 0)), (0, 56, (0, 7)), (56, 56, (7, 7)), (24, 32, (3, 4))]
)
def test_the_hottest_cell_is_the_patch(top: int, left: int, cell: tuple[int, int]) -> None:
    image = photo_with_patch(top, left, 8)
    heat = explain(patch_model(top, left, 8), image, class_index=1)  # type: ignore[arg-type]
    assert heat.shape == (8, 8) and heat.dtype == np.float32
    assert tuple(int(i) for i in np.unravel_index(heat.argmax(), heat.shape)) == cell
    assert heat.max() == 1.0 and heat.min() >= 0.0
    # Far from the patch, hiding changes nothing.
    far = (0 if cell[0] >= 4 else 7, 0 if cell[1] >= 4 else 7)
    assert heat[far] == 0.0


def test_the_cost_is_the_positions_and_the_photo() -> None:
    calls: list[int] = []
    model = patch_model(0, 0, 8)

    def counted(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return model(images)  # type: ignore[operator,no-any-return]

    explain(counted, photo_with_patch(0, 0, 8), 1)
    assert sum(calls) == Occlusion().passes == 50
    assert len(calls) == 2  # batched (32 at a time), never one by one
    assert Occlusion(grid=7, window=1).passes == 50


def test_the_first_input_is_the_photo_and_each_other_hides_one_square() -> None:
    image = photo_with_patch(0, 0, 8)
    occlusion = Occlusion(grid=4, window=2)
    inputs = occlusion.inputs(image)
    assert inputs.shape == (10, 64, 64, 3)
    assert np.array_equal(inputs[0], image)
    changed = (inputs[1:] != image).any(axis=3)
    # Position (0, 0) hides the top-left 32 x 32 pixels and nothing else.
    assert changed[0, :32, :32].all() and not changed[0, 32:].any() and not changed[0, :, 32:].any()


def test_nothing_matters_is_a_cold_map() -> None:
    occlusion = Occlusion()
    assert not occlusion.heat_map(np.full(occlusion.passes, 0.5)).any()


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="grid"):
        Occlusion(grid=4, window=4)
    with pytest.raises(ValueError, match="uint8"):
        Occlusion().inputs(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="smaller"):
        Occlusion().inputs(np.zeros((4, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="finite"):
        Occlusion().heat_map(np.full(50, np.nan))
    with pytest.raises(ValueError, match="50"):
        Occlusion().heat_map(np.zeros(49))


def test_the_overlay_is_the_photo_reddened_where_the_heat_is() -> None:
    image = np.full((64, 48, 3), 128, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[0, 0] = 1.0
    png = overlay_png(image, heat)
    assert png.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(png)) as opened:
        assert opened.size == (48, 64) and opened.mode == "RGB"
        pixels = np.asarray(opened).astype(int)
    top_left, bottom_right = pixels[2, 2], pixels[60, 44]
    assert top_left[0] > 160 and top_left[2] < 100  # red over the hot cell
    assert np.abs(bottom_right - 128).max() <= 2  # the photo as it is where nothing matters
