"""Decode and validate image bytes, then shape them into a model's input.

Every image passes `decode_image` before it reaches a model, so that a bad upload becomes a
clear `InvalidImage` naming the check it failed instead of a crash, a hang or a wrong answer.
Training, serving and the workers all use `load_model_input`, so a model sees its pixels
prepared the same way everywhere: the same accepted formats (`ACCEPTED_FORMATS`, decided by
content, never by file name), EXIF orientation applied, embedded colour profiles converted to
sRGB, alpha composited on white, and every bit depth brought to 8-bit RGB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from perito_core.errors import InvalidImage
from perito_core.quality import QualityMeasures, measure

ResizeMode = Literal["center_crop", "squash"]
Interpolation = Literal["nearest", "bilinear", "bicubic"]


def _register_heif_opener() -> bool:
    """Teach Pillow HEIC/HEIF (iPhone photos) through `pillow-heif`, once, at import.

    The package is a dependency of the server, worker and training installs; without it this
    module still imports and HEIC files are refused as NOT_AN_IMAGE.
    """
    try:
        from pillow_heif import register_heif_opener
    except ImportError:  # pragma: no cover - the serve extra installs it
        return False
    # Never decode an embedded thumbnail in place of the photo (see _SCALED_DECODE_FORMATS).
    register_heif_opener(thumbnails=False)
    return True


HEIF_SUPPORTED = _register_heif_opener()

ACCEPTED_FORMATS: tuple[str, ...] = (
    "JPEG",
    "MPO",
    "PNG",
    "WEBP",
    "GIF",
    "BMP",
    "TIFF",
    "HEIF",
    "AVIF",
)
"""Pillow format names `decode_image` opens; anything else is NOT_AN_IMAGE. MPO is the JPEG
variant with extra embedded pictures (many Samsung, Fujifilm, Sony and iPhone portrait photos);
HEIF covers `.heic`/`.heif` files (through `pillow-heif`)."""

ACCEPTED_FORMATS_TEXT = "JPEG (and MPO), PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF or AVIF"
"""`ACCEPTED_FORMATS` for people: named in error messages and docs."""


def _openers() -> tuple[str, ...]:
    """The formats to let `Image.open` try: Pillow's JPEG opener also yields MPO files, and a
    format whose plugin is missing from this install is left out."""
    Image.init()
    return tuple(name for name in ACCEPTED_FORMATS if name in Image.OPEN)


_OPENERS = _openers()

# Formats whose decoder can decode straight to a reduced size: libjpeg's DCT scaling, for the
# JPEG family. HEIF is not among them: its HEVC decoder has no scaled mode, and what
# pillow-heif offers instead (decoding an embedded thumbnail) swaps in a different, separately
# encoded picture of unknown quality: libheif scales its thumbnails by nearest neighbour, which
# moved model inputs by 3-6/255 on average (up to 100) against the full decode. iPhone
# thumbnails (320x240) are too small for a 256-pixel resize anyway.
_SCALED_DECODE_FORMATS = frozenset({"JPEG", "MPO"})

# Rows per strip when high bit-depth pixels are brought to 8 bits: about 1M pixels at a time,
# so the numpy working memory stays a few MiB whatever the image size.
_STRIP_PIXELS = 1 << 20


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


@dataclass(frozen=True)
class DecodeInfo:
    """What `decode_image_with_info` found besides the pixels.

    Attributes:
        format: Pillow's name of the file's format, one of `ACCEPTED_FORMATS`.
        frames: frames (or pages, or images) in the file; 1 for a still photo. Only the first
            (the primary image) is decoded.
        icc_converted: True when an embedded colour profile other than sRGB was converted to
            sRGB.
        width, height: the photo's size in pixels, upright (EXIF orientation applied), as
            stored: a reduced-scale decode does not change them. 0 where not known.
        quality: the photo-quality measures (`perito_core.quality`), when asked for
            (`load_model_input_with_info`); None otherwise.
    """

    format: str
    frames: int
    icc_converted: bool
    width: int = 0
    height: int = 0
    quality: QualityMeasures | None = None

    @property
    def first_frame_only(self) -> bool:
        """True when the file holds several pictures and only the first was classified (an
        animated GIF / WebP / PNG, a multi-page TIFF, a HEIF burst). An MPO's extra pictures
        (previews, depth or stereo views of the same shot) do not count."""
        return self.frames > 1 and self.format != "MPO"


def decode_image(
    data: bytes, limits: ImageLimits = ImageLimits(), *, min_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode and validate image bytes into an upright 8-bit sRGB image.

    The same as `decode_image_with_info`, without the information.

    Args:
        data: the encoded file, in one of `ACCEPTED_FORMATS` (decided by content).
        limits: size bounds checked before the pixels are decoded.
        min_size: if given, a JPEG or MPO may be decoded at a reduced scale (libjpeg DCT
            scaling) as long as both sides stay at least this large: much faster for big
            photos.

    Returns:
        A loaded PIL image in mode "RGB" (8 bits per channel, sRGB).

    Raises:
        InvalidImage: with `reason` EMPTY, TOO_LARGE, NOT_AN_IMAGE, DECOMPRESSION_BOMB,
            BAD_DIMENSIONS, TRUNCATED, CORRUPT or UNSUPPORTED_MODE.
    """
    image, _ = decode_image_with_info(data, limits, min_size=min_size)
    return image


def decode_image_with_info(
    data: bytes, limits: ImageLimits = ImageLimits(), *, min_size: tuple[int, int] | None = None
) -> tuple[Image.Image, DecodeInfo]:
    """Decode and validate image bytes into an upright 8-bit sRGB image, saying what it was.

    In order: the byte and header checks (the pixel count is checked from the header, before
    anything is decoded), the reduced-scale decode when allowed, the first frame only, EXIF
    orientation, high bit depths scaled to 8 bits, the embedded ICC profile converted to sRGB
    (a profile that cannot be read leaves the pixels as stored), alpha composited on white.

    Args:
        data: the encoded file, in one of `ACCEPTED_FORMATS` (decided by content).
        limits: size bounds checked before the pixels are decoded.
        min_size: if given, a JPEG or MPO may be decoded at a reduced scale (libjpeg DCT
            scaling) as long as both sides stay at least this large.

    Returns:
        The image (a loaded PIL image in mode "RGB", 8 bits per channel, sRGB) and a
        `DecodeInfo` (format, frame count, whether a colour profile was converted).

    Raises:
        InvalidImage: with `reason` EMPTY, TOO_LARGE, NOT_AN_IMAGE, DECOMPRESSION_BOMB,
            BAD_DIMENSIONS, TRUNCATED, CORRUPT or UNSUPPORTED_MODE.
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
            image: Image.Image = Image.open(io.BytesIO(data), formats=_OPENERS)
    except UnidentifiedImageError:
        claimed = _claimed_format(data)
        if claimed is not None:  # its header says what it is, but its body cannot be read
            raise InvalidImage(
                f"image data is damaged: the file starts as {claimed} but cannot be read "
                "(cut short or corrupt)",
                reason="CORRUPT",
            ) from None
        raise _not_an_image() from None
    except Image.DecompressionBombError as exc:
        raise _bomb(exc, limits) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if _claimed_format(data) is None:  # a weak match ("BM..." text taken for a bitmap)
            raise _not_an_image() from None
        raise _damaged(exc) from None

    _check_dimensions(image.size, limits)
    full_size = image.size
    image_format = image.format or ""
    frames = _frame_count(image)
    if min_size is not None and image_format in _SCALED_DECODE_FORMATS:
        image.draft("RGB", min_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as exc:
        raise _bomb(exc, limits) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _damaged(exc) from None
    if image_format in ("JPEG", "MPO") and _grey_tail(image):
        _check_scan_complete(data)
    icc_profile = image.info.get("icc_profile")
    loaded_size = image.size
    # A broken EXIF block must not cost the image: it is then used as stored. In place: the
    # decoded image is this function's own, and a copy of an upright photo (the usual case)
    # would cost a full-size pixel copy.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    if image.size != loaded_size:  # turned a quarter: the stored size is upright swapped
        full_size = (full_size[1], full_size[0])
    image = _to_8_bit(image)
    image, icc_converted = _to_srgb(image, icc_profile)
    info = DecodeInfo(
        format=image_format,
        frames=frames,
        icc_converted=icc_converted,
        width=full_size[0],
        height=full_size[1],
    )
    return _flatten(image), info


def _frame_count(image: Image.Image) -> int:
    """How many frames the file holds, leaving it on the one it opened on (the first, or a
    HEIF's primary image); 1 if the count is unreadable (damaged later frames do not cost
    the first one)."""
    current = image.tell()
    try:
        frames = int(getattr(image, "n_frames", 1))
    except Exception:  # noqa: BLE001 - any decoder failure here only loses the count
        frames = 1
    if image.tell() != current:  # Pillow's n_frames seeks back itself; a failure may not
        try:
            image.seek(current)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _damaged(exc) from None
    return max(frames, 1)


def _not_an_image() -> InvalidImage:
    return InvalidImage(
        f"not a recognised image format (accepted: {ACCEPTED_FORMATS_TEXT})",
        reason="NOT_AN_IMAGE",
    )


def _claimed_format(data: bytes) -> str | None:
    """The accepted format whose signature `data` starts with, if any. BMP's two-letter
    signature ("BM") is too weak to call a text file a damaged bitmap."""
    prefix = data[:16]
    for name in _OPENERS:
        if name == "BMP":
            continue
        accept = Image.OPEN[name][1]
        with contextlib.suppress(Exception):
            if accept is not None and accept(prefix) is True:
                return "HEIC/HEIF" if name == "HEIF" else name
    return None


def _damaged(exc: BaseException) -> InvalidImage:
    text = str(exc).lower()
    truncated = "truncated" in text or "end of file" in text
    return InvalidImage(
        f"image data is damaged{' (the file is cut short)' if truncated else ''}: {exc}",
        reason="TRUNCATED" if truncated else "CORRUPT",
    )


def _grey_tail(image: Image.Image) -> bool:
    """Whether a decoded JPEG's last stored row is mid-grey (128 in every channel) from end to
    end: what libjpeg fills an image with past the end of its scan data, so the sign of a file
    cut short with an end marker after the cut (libjpeg only warns of that, and Pillow decodes
    it as whole). One pixel, then one row's bytes: a microsecond or a few."""
    if image.mode not in ("RGB", "L"):
        return False
    last = image.getpixel((image.width - 1, image.height - 1))  # most photos end here
    if last not in (128, (128, 128, 128)):
        return False
    row = image.crop((0, image.height - 1, image.width, image.height)).tobytes()
    return row == b"\x80" * len(row)


def _check_scan_complete(data: bytes) -> None:
    """Refuse a JPEG whose scan ends before its image does (libjpeg's "premature end of data
    segment" or "of JPEG file" warnings), found by decoding it again strictly, at 1/8 scale in
    grey (simplejpeg: libjpeg-turbo with warnings raised). Only asked of a JPEG with a grey
    tail (`_grey_tail`), so a photo whose bottom row really is mid-grey pays one such decode
    and is kept; other warnings (extraneous bytes, common in cameras' files) keep the image.

    Raises:
        InvalidImage: reason TRUNCATED.
    """
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(
            data,
            colorspace="GRAY",
            fastdct=True,
            fastupsample=True,
            min_height=1,
            min_width=1,
            strict=True,
        )
    except ValueError as exc:
        if "premature end" in str(exc).lower():
            raise InvalidImage(
                "image data is damaged (the file is cut short): its JPEG scan data ends before "
                "the image does, and the rest would be filled in grey",
                reason="TRUNCATED",
            ) from None


def _bomb(exc: Image.DecompressionBombError, limits: ImageLimits) -> InvalidImage:
    """Pillow's refusal of a header naming more pixels than it ever opens (twice
    `Image.MAX_IMAGE_PIXELS`, before Perito's own limits are looked at) in Perito's words:
    the pixel count Pillow read, against Perito's limit."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return InvalidImage(
        f"image is {size}; the limit is {limits.max_pixels:,} (a possible decompression bomb)",
        reason="DECOMPRESSION_BOMB",
    )


def _check_dimensions(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})", reason="BAD_DIMENSIONS")
    if width * height > limits.max_pixels:
        raise InvalidImage(
            f"image is {width}x{height} = {width * height:,} pixels; the limit is "
            f"{limits.max_pixels:,} (a possible decompression bomb)",
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


def _to_8_bit(image: Image.Image) -> Image.Image:
    """Bring any PIL mode to one of L, LA, RGB, RGBA, CMYK with 8 bits per channel, the modes
    a colour profile can be applied to: palettes expanded, 16-bit and float scaled."""
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode == "P":
        return image.convert("RGBA" if image.has_transparency_data else "RGB")
    if mode in ("PA", "RGBa"):
        return image.convert("RGBA")
    if mode == "La":
        return image.convert("LA")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_l(image)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InvalidImage(
            f"unsupported image mode {mode!r}: {exc}", reason="UNSUPPORTED_MODE"
        ) from None


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image as 8-bit "L", in bounded memory.

    Integer values are scaled from 0..65535 (PNG's and TIFF's 16-bit range; 32-bit values
    above it clipped), floats from 0..1 (clipped, NaN as 0), each the same way whatever the
    image's own extremes: two images a pixel apart are never scaled apart (a 16-bit image
    whose values all stay under 256 is near black, as it is). The work goes in strips of about
    1M pixels with uint32 / float32 arithmetic, so the only whole-image buffer is the 8-bit
    result (never a float64 copy).
    """
    width, height = image.size
    is_float = image.mode == "F"
    out = np.empty((height, width), dtype=np.uint8)
    for top, strip in _strips(image):
        bottom = top + strip.shape[0]
        if is_float:
            values = strip.astype(np.float32)
            np.nan_to_num(values, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
            np.clip(values, 0.0, 1.0, out=values)
            values *= np.float32(255.0)
            values += np.float32(0.5)
            out[top:bottom] = values  # truncating after +0.5: rounding
        else:
            wide = np.clip(strip, 0, 65535).astype(np.uint32)
            # round(x * 255 / 65535), exactly, in integers.
            wide *= np.uint32(255)
            wide += np.uint32(32767)
            wide //= np.uint32(65535)
            out[top:bottom] = wide
    return Image.fromarray(out)


def _strips(image: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """The image's pixels as numpy arrays of about `_STRIP_PIXELS` each: (top row, rows)."""
    width, height = image.size
    rows = max(1, _STRIP_PIXELS // width)
    for top in range(0, height, rows):
        yield top, np.asarray(image.crop((0, top, width, min(height, top + rows))))


def _to_srgb(image: Image.Image, icc_profile: object) -> tuple[Image.Image, bool]:
    """Convert pixels from their embedded ICC profile to sRGB (perceptual intent).

    Returns the image and whether it was converted. No profile, an sRGB profile, a profile
    that does not match the pixels (a greyscale profile on colour pixels) or one that cannot
    be read all leave the image as stored: a broken profile must not cost the image.
    """
    if not isinstance(icc_profile, bytes) or not icc_profile:
        return image, False
    try:
        transform = _srgb_transform(icc_profile, image.mode)
        if transform is None:
            return image, False
        converted = ImageCms.applyTransform(image, transform)
    except Exception:  # noqa: BLE001 - LittleCMS failures are many; the pixels stay usable
        return image, False
    if converted is None:  # pragma: no cover - only for in-place transforms
        return image, False
    return converted, True


# (profile colour space, image mode) -> output mode, for the pairs LittleCMS converts.
_ICC_MODES = {
    ("RGB", "RGB"): "RGB",
    ("RGB", "RGBA"): "RGBA",
    ("GRAY", "L"): "RGB",
    ("CMYK", "CMYK"): "RGB",
}


@functools.lru_cache(maxsize=32)
def _srgb_transform(icc_profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from `icc_profile` to sRGB for pixels in `mode`, built once per profile
    (building costs milliseconds; applying it is the per-image cost). None when no conversion
    is needed or possible."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    colour_space = profile.profile.xcolor_space.strip()
    out_mode = _ICC_MODES.get((colour_space, mode))
    if out_mode is None:
        return None
    description = ImageCms.getProfileDescription(profile).strip().lower()
    if colour_space == "RGB" and description.startswith("srgb"):
        return None  # already sRGB: the transform would cost time and change nothing
    return ImageCms.buildTransform(
        profile, _SRGB, mode, out_mode, renderingIntent=ImageCms.Intent.PERCEPTUAL
    )


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _flatten(image: Image.Image) -> Image.Image:
    """L, LA, RGB, RGBA or CMYK as 8-bit RGB; transparent pixels composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, (0, 0), image)
        return background
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:  # pragma: no cover - _to_8_bit leaves only these modes
        raise InvalidImage(
            f"unsupported image mode {image.mode!r}: {exc}", reason="UNSUPPORTED_MODE"
        ) from None


def resize_geometry(
    width: int, height: int, spec: InputSpec
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a width x height photo goes on its way to `spec`'s input: ((width, height) it is
    resized to, (left, top) of the crop taken from that). `center_crop`: the shorter side to
    `spec.resize_size` (each side at least the input's), then the centre; `squash`: straight to
    the input size, no crop."""
    if spec.resize_mode == "squash":
        return (spec.width, spec.height), (0, 0)
    scale = spec.resize_size / min(width, height)
    size = (max(spec.width, round(width * scale)), max(spec.height, round(height * scale)))
    return size, ((size[0] - spec.width) // 2, (size[1] - spec.height) // 2)


def resize_for_model(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Resize (and centre-crop) an RGB image to the model's input (`resize_geometry`).

    `bilinear` and `bicubic` resample with torch's antialiased uint8 kernels
    (`torch.nn.functional.interpolate(..., antialias=True)` on a channels-last uint8 tensor:
    Pillow's filters, support widened by the scale when shrinking, bicubic's a = -0.5, each
    pass rounded to 8 bits, written to give Pillow's pixels), single-threaded. They give
    Pillow's `Image.resize` pixels within 1 grey level, but for about one value in a million 2
    levels off (the two round their fixed-point weights differently;
    `tests/unit/test_imaging_resize.py`), and a 640x480 JPEG's bytes become the 256-then-224
    input in 2.34 ms (bilinear) and 2.27 (bicubic) where Pillow's resize took 3.36 and 4.44
    (`bench/decoders.py`, 2-core AMD EPYC, one run). `nearest` is Pillow's (exact: it picks
    samples, where one pixel of difference would be a jump).

    Args:
        image: an 8-bit RGB image, as `decode_image` returns.
        spec: the model's input size and resize recipe.

    Returns:
        A uint8 array of shape (spec.height, spec.width, 3).
    """
    (width, height), (left, top) = resize_geometry(image.width, image.height, spec)
    if spec.interpolation == "nearest":
        if (width, height) != image.size:
            image = image.resize((width, height), Image.Resampling.NEAREST)
        return np.asarray(image.crop((left, top, left + spec.width, top + spec.height)))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # a writable copy, (H, W, 3)
    # Pillow's order of the two passes: each rounds to 8 bits, so the order shows in the
    # pixels. torch runs the horizontal pass first; where Pillow runs the vertical one first,
    # it is asked for alone.
    passes = [(height, width)]
    if not _horizontal_first(image.size, (width, height)):
        passes.insert(0, (height, image.width))
    with torch.inference_mode():
        x = pixels.permute(2, 0, 1)[None]  # (1, 3, H, W), channels-last in memory
        for size in passes:
            if size != tuple(x.shape[2:]):
                x = torch.nn.functional.interpolate(
                    x, size=size, mode=spec.interpolation, antialias=True, align_corners=False
                )
    crop = x[0].permute(1, 2, 0)[top : top + spec.height, left : left + spec.width]
    return np.ascontiguousarray(crop.numpy())


def _horizontal_first(source: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether Pillow's resampling from `source` to `size` (width, height) runs its horizontal
    pass before its vertical one: Pillow 13 runs the vertical pass first when the height
    shrinks by more than twice as many pixels as the width."""
    shrink_x, shrink_y = source[0] - size[0], source[1] - size[1]
    return not (shrink_y > 0 and shrink_y > shrink_x * 2)


def load_model_input(
    data: bytes, spec: InputSpec, limits: ImageLimits = ImageLimits()
) -> np.ndarray:
    """Validate, decode and resize one encoded image into a model input.

    The one preparation training, evaluation, serving and the workers all use.

    Args:
        data: the encoded file, in one of `ACCEPTED_FORMATS`.
        spec: the model's input size and resize recipe.
        limits: size bounds checked before the pixels are decoded.

    Returns:
        A uint8 array of shape (spec.height, spec.width, 3), sRGB.

    Raises:
        InvalidImage: as `decode_image`.
    """
    return load_model_input_with_info(data, spec, limits, measure_quality=False)[0]


def load_model_input_with_info(
    data: bytes,
    spec: InputSpec,
    limits: ImageLimits = ImageLimits(),
    *,
    measure_quality: bool = True,
) -> tuple[np.ndarray, DecodeInfo]:
    """`load_model_input`, and what the decode found (format, frames, colour conversion, the
    photo's upright size), so that an answer can say when only an animation's first frame was
    classified; with `measure_quality`, also the photo-quality measures
    (`perito_core.quality.measure`, `DecodeInfo.quality`), taken from the decoded photo before
    it is resized (from the reduced-scale decode of a big JPEG: still at least the model's
    resize size), its resolution against the model's input side (the shorter of `spec`'s).

    Raises:
        InvalidImage: as `decode_image`.
    """
    target = spec.resize_size if spec.resize_mode == "center_crop" else max(spec.height, spec.width)
    image, info = decode_image_with_info(data, limits, min_size=(target, target))
    if measure_quality:
        measures = measure(image, min(spec.height, spec.width), size=(info.width, info.height))
        info = dataclasses.replace(info, quality=measures)
    return resize_for_model(image, spec), info
