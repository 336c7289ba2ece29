"""An image that breaks the model fails alone, and its item's error tells the job's owner
where the worker's log has the model's words, never the words themselves (they may quote
the model's code or the server's files)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from perito_core.jobs.items import ItemInput
from perito_worker.processing import _predict, _Prepared

SECRET = "/srv/perito/cache/models/acme-secret/3/model.onnx: index 7 out of range"


class _Breaks:
    """A model whose forward pass raises for a batch holding an all-white image."""

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        if (pixels.reshape(len(pixels), -1) == 255).all(axis=1).any():
            raise RuntimeError(SECRET)
        return np.full((len(pixels), 2), 0.5, np.float32)


def _prepared(index: int, level: int) -> _Prepared:
    pixels = np.full((4, 4, 3), level, np.uint8)
    return _Prepared(index, ItemInput(id=f"{index}.jpg", uri=f"/data/{index}.jpg"), pixels)


def test_the_image_that_breaks_the_model_fails_alone_without_the_models_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = [_prepared(4, 10), _prepared(5, 255), _prepared(6, 20)]
    with caplog.at_level(logging.WARNING):
        first, broken, last = _predict(_Breaks(), good, "job-1")  # type: ignore[arg-type]
    assert isinstance(first, np.ndarray) and isinstance(last, np.ndarray)
    assert broken == (
        "INTERNAL: the model failed on this image alone; the worker's log has it under "
        "job job-1 item 5"
    )
    assert SECRET in caplog.text and "job job-1 item 5" in caplog.text


def test_a_model_that_fails_on_every_image_ends_the_attempt_with_its_error() -> None:
    with pytest.raises(RuntimeError, match="index 7"):
        _predict(_Breaks(), [_prepared(0, 255), _prepared(1, 255)], "job-1")  # type: ignore[arg-type]
