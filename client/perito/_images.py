"""Turn what callers have (paths, bytes, PIL images, numpy arrays) into encoded bytes."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Union

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]


def image_name(image: ImageInput, index: int) -> str:
    """A readable id for an image: its file name, or its position."""
    if isinstance(image, str | os.PathLike):
        return Path(image).name
    return str(index)


def encode_image(image: ImageInput) -> bytes:
    """Encoded image bytes for any supported input. PIL and numpy inputs are sent as PNG."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if type(image).__module__.startswith("numpy"):
        from PIL import Image

        image = Image.fromarray(image)
    if hasattr(image, "save"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(
        f"cannot send a {type(image).__name__} as an image: give a path, bytes, a PIL image "
        "or a numpy array"
    )
