"""Decode and validate image bytes, then shape them into a model's input.

Every image passes `decode_image` before it reaches a model, so that a bad upload becomes a
clear `InvalidImage` naming the check it failed instead of a crash, a hang or a wrong answer.
Training, serving and the workers all use `load_model_input`, so a model sees its pixels
prepared the same way everywhere.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from perito_core.errors import InvalidImage

ResizeMode = Literal["center_crop", "squash"]
Interpolation = Literal["nearest", "bilinear", "bicubic"]

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class ImageLimits:
    """Bounds an image must respect before it is decoded in full.

    The pixel bound is checked from the header, before decoding, which is what stops a
    decompression bomb (a small file that inflates to gigabytes).
    """

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 64_000_000
    max_side: int = 20_000
    max_aspect_ratio: float = 50.0


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes a model's input; recorded in every model's manifest.

    `center_crop` resizes the shorter side to `resize_size` then crops the centre
    (the ImageNet evaluation transform); `squash` resizes straight to the input size.
    """

    height: int
    width: int
    resize_size: int
    resize_mode: ResizeMode = "center_crop"
    interpolation: Interpolation = "bilinear"


def decode_image(
    data: bytes, limits: ImageLimits = ImageLimits(), *, min_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode and validate image bytes into an upright 8-bit RGB image.

    Args:
        data: the encoded file: JPEG, PNG, WebP, GIF, BMP, TIFF.
        limits: size bounds checked before the pixels are decoded.
        min_size: if given, a JPEG may be decoded at a reduced scale (libjpeg DCT scaling)
            as long as both sides stay at least this large: much faster for big photos.

    Raises:
        InvalidImage: with `reason` EMPTY, TOO_LARGE, NOT_AN_IMAGE, DECOMPRESSION_BOMB,
            BAD_DIMENSIONS, TRUNCATED or UNSUPPORTED_MODE.
    """
    if not data:
        raise InvalidImage("image is empty (0 bytes)", reason="EMPTY")
    if len(data) > limits.max_bytes:
        raise InvalidImage(
            f"image is {len(data):,} bytes; the limit is {limits.max_bytes:,}", reason="TOO_LARGE"
        )
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the bound; PIL's warning is noise beside it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImage(
            "not a recognised image format (expected JPEG, PNG, WebP, GIF, BMP or TIFF)",
            reason="NOT_AN_IMAGE",
        ) from None
    except Image.DecompressionBombError as exc:
        raise InvalidImage(str(exc), reason="DECOMPRESSION_BOMB") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _damaged(exc) from None

    _check_dimensions(image.size, limits)
    if min_size is not None and image.format == "JPEG":
        image.draft("RGB", min_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as exc:
        raise InvalidImage(str(exc), reason="DECOMPRESSION_BOMB") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _damaged(exc) from None
    # A broken EXIF block must not cost the image: it is then used as stored.
    with contextlib.suppress(Exception):
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def _damaged(exc: BaseException) -> InvalidImage:
    truncated = "truncated" in str(exc).lower()
    return InvalidImage(
        f"image data is damaged{' (the file is cut short)' if truncated else ''}: {exc}",
        reason="TRUNCATED" if truncated else "CORRUPT",
    )


def _check_dimensions(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})", reason="BAD_DIMENSIONS")
    if width * height > limits.max_pixels:
        raise InvalidImage(
            f"image is {width}x{height} = {width * height / 1e6:.0f} megapixels; the limit is "
            f"{limits.max_pixels / 1e6:.0f} (a possible decompression bomb)",
            reason="DECOMPRESSION_BOMB",
        )
    if max(width, height) > limits.max_side:
        raise InvalidImage(
            f"image is {width}x{height}; no side may exceed {limits.max_side}",
            reason="BAD_DIMENSIONS",
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise InvalidImage(
            f"image is {width}x{height}; an aspect ratio over {limits.max_aspect_ratio:g}:1 "
            "is not a photo",
            reason="BAD_DIMENSIONS",
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Bring any PIL mode to 8-bit RGB: alpha over white, 16-bit scaled, CMYK converted."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if mode == "F":
            scale = 255.0 if pixels.max(initial=0.0) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0 if pixels.max(initial=0.0) > 255 else 1.0
        grey = np.clip(pixels * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InvalidImage(
            f"unsupported image mode {mode!r}: {exc}", reason="UNSUPPORTED_MODE"
        ) from None


def resize_for_model(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Resize (and centre-crop) an RGB image to the model's input: uint8, HxWx3."""
    resample = _RESAMPLE[spec.interpolation]
    if spec.resize_mode == "squash":
        resized = image.resize((spec.width, spec.height), resample)
    else:
        width, height = image.size
        scale = spec.resize_size / min(width, height)
        new_size = (max(spec.width, round(width * scale)), max(spec.height, round(height * scale)))
        resized = image.resize(new_size, resample)
        left = (new_size[0] - spec.width) // 2
        top = (new_size[1] - spec.height) // 2
        resized = resized.crop((left, top, left + spec.width, top + spec.height))
    return np.asarray(resized, dtype=np.uint8)


def load_model_input(
    data: bytes, spec: InputSpec, limits: ImageLimits = ImageLimits()
) -> np.ndarray:
    """Validate, decode and resize one encoded image into a model input (uint8 HxWx3)."""
    target = spec.resize_size if spec.resize_mode == "center_crop" else max(spec.height, spec.width)
    image = decode_image(data, limits, min_size=(target, target))
    return resize_for_model(image, spec)
