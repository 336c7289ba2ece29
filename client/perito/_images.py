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


class ImageInputError(ValueError):
    """An image the client cannot send: a file it cannot read, an array or a picture it
    cannot encode. Its message says why, without the image's position (the caller adds it)."""


# The PIL modes PNG stores as they are; any other is converted (CMYK, YCbCr, LAB, HSV, RGBX
# and 32-bit "I" / "F" to RGB, "PA" to RGBA), as the server would read them.
_PNG_MODES = ("1", "L", "LA", "I;16", "P", "RGB", "RGBA")


def encode_image(image: ImageInput) -> bytes:
    """Encoded image bytes for any supported input. PIL and numpy inputs are sent as PNG:
    numpy arrays as uint8 [H, W] (grey), [H, W, 3] (RGB) or [H, W, 4] (RGBA).

    Raises:
        TypeError: not an image input at all (None, a file object, a number).
        ImageInputError: a file that cannot be read, or an array or PIL image that cannot be
            sent (its dtype, shape or mode said).
    """
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        try:
            return Path(image).read_bytes()
        except OSError as error:
            raise ImageInputError(f"cannot read {os.fspath(image)!r}: {error.strerror}") from None
    if type(image).__module__.startswith("numpy"):
        image = _from_array(image)
    if hasattr(image, "save"):
        mode = getattr(image, "mode", "RGB")
        if mode not in _PNG_MODES:
            try:
                image = image.convert("RGBA" if mode == "PA" else "RGB")
            except (ValueError, OSError) as error:
                raise ImageInputError(f"a PIL image in mode {mode}: {error}") from None
        buffer = io.BytesIO()
        try:
            image.save(buffer, format="PNG")
        except (ValueError, OSError) as error:
            raise ImageInputError(f"a PIL image in mode {mode}: {error}") from None
        return buffer.getvalue()
    raise TypeError(
        f"cannot send a {type(image).__name__} as an image: give a path, bytes, a PIL image "
        "or a numpy array"
    )


def _from_array(array: Any) -> Any:
    """A numpy array as a PIL image, if it is uint8 [H, W], [H, W, 3] or [H, W, 4].

    Raises:
        ImageInputError: any other dtype or shape, both said.
    """
    from PIL import Image

    shape = tuple(getattr(array, "shape", ()))
    dtype = str(getattr(array, "dtype", "?"))
    if dtype != "uint8" or not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (3, 4))):
        raise ImageInputError(
            f"a numpy array of {dtype} {list(shape)}: send uint8 [H, W] (grey), [H, W, 3] "
            "(RGB) or [H, W, 4] (RGBA); scale floats to 0-255 and move channels last first"
        )
    if 0 in shape:
        raise ImageInputError(f"a numpy array of {dtype} {list(shape)} holds no pixels")
    return Image.fromarray(array)
