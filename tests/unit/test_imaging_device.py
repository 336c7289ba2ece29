"""The device decode path (`perito_core.imaging_device`) against the Pillow path
(`load_model_input_with_info`), run with device="cpu" (torchvision's CPU decoder): the same
model input within the module's stated bounds, the same quality measures, and every image the
device path does not take handed to the Pillow path, never an error for a readable photo."""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageCms

from perito_core.errors import InvalidImage, NotFound
from perito_core.imaging import (
    DecodeInfo,
    ImageLimits,
    InputSpec,
    load_model_input_with_info,
)
from perito_core.imaging_device import (
    DeviceDecoded,
    JpegHeader,
    decode_jpeg_batch,
    device_decode_refusal,
    draft_scale,
    frame_marker,
    inspect_jpeg,
    prepare_batch,
)
from perito_core.quality import QualityMeasures

CENTRE = InputSpec(height=224, width=224, resize_size=256)
RECIPES = [
    CENTRE,
    InputSpec(height=224, width=224, resize_size=256, interpolation="bicubic"),
    InputSpec(height=224, width=224, resize_size=224, resize_mode="squash"),
    InputSpec(height=240, width=320, resize_size=256),
]
# (photo, size): each photo at its own size (decoded at full scale for these recipes), and
# enlarged to where Pillow decodes at 1/2 (1024x768), 1/4 (1600x1200) and 1/8 (4000x3000).
SIZES: list[tuple[str, tuple[int, int] | None]] = [
    *((name, None) for name in ("coffee", "chelsea", "rocket", "astronaut", "china", "flower")),
    *((name, (1024, 768)) for name in ("coffee", "chelsea", "astronaut", "china")),
    ("rocket", (1600, 1200)),
    ("flower", (1200, 1600)),
    ("china", (4000, 3000)),
    ("astronaut", (3000, 4000)),
]


def jpeg(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **params)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_jpegs(photos: dict[str, Path]) -> dict[tuple[str, tuple[int, int] | None], bytes]:
    out = {}
    for name, size in SIZES:
        with Image.open(photos[name]) as opened:
            image = opened.convert("RGB")
            out[(name, size)] = jpeg(image if size is None else image.resize(size))
    return out


def device_input(data: bytes, spec: InputSpec) -> tuple[np.ndarray, DecodeInfo]:
    header = inspect_jpeg(data)
    assert isinstance(header, JpegHeader), header
    (decoded,) = decode_jpeg_batch([(data, header)], spec, "cpu")
    assert decoded is not None
    return decoded.with_quality(spec)


def assert_measures_close(got: QualityMeasures, want: QualityMeasures) -> None:
    """The module docstring's bounds: sharpness within 2%, brightness and contrast within
    0.5 grey levels, the clipped shares within 0.005; sizes and resolution the same."""
    assert got.sharpness == pytest.approx(want.sharpness, rel=0.02)
    assert got.brightness == pytest.approx(want.brightness, abs=0.5)
    assert got.contrast == pytest.approx(want.contrast, abs=0.5)
    assert got.dark_fraction == pytest.approx(want.dark_fraction, abs=0.005)
    assert got.bright_fraction == pytest.approx(want.bright_fraction, abs=0.005)
    assert (got.width, got.height, got.resolution) == (want.width, want.height, want.resolution)


@pytest.mark.parametrize("spec", RECIPES, ids=lambda s: f"{s.resize_mode}-{s.interpolation}")
def test_model_input_and_quality_match_the_pillow_path(
    photo_jpegs: dict[tuple[str, tuple[int, int] | None], bytes], spec: InputSpec
) -> None:
    for (name, _), data in photo_jpegs.items():
        want, want_info = load_model_input_with_info(data, spec)
        got, info = device_input(data, spec)
        assert got.shape == want.shape == (spec.height, spec.width, 3) and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - want.astype(int))
        assert (info.format, info.frames, info.width, info.height) == (
            want_info.format,
            want_info.frames,
            want_info.width,
            want_info.height,
        )
        assert info.quality is not None and want_info.quality is not None
        if draft_scale(info.width, info.height, spec) == 1:  # the same decoded pixels
            assert diff.max() <= (1 if spec.interpolation == "bilinear" else 8), name
            assert info.quality == want_info.quality, name
        else:  # box average in place of libjpeg's reduced inverse DCT
            assert diff.mean() <= 1.0, name
            assert np.percentile(diff, 99) <= 8, name
            assert_measures_close(info.quality, want_info.quality)


def test_draft_scale_is_pillows() -> None:
    for size in [(640, 480), (1024, 768), (1600, 1200), (4000, 3000), (511, 2000), (100, 80)]:
        with Image.new("RGB", size) as image:
            opened = Image.open(io.BytesIO(jpeg(image)))
            opened.draft("RGB", (256, 256))
            scale = draft_scale(*size, CENTRE)
            assert opened.size == (-(-size[0] // scale), -(-size[1] // scale)), size


def rotated(photo: Path) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    with Image.open(photo) as image:
        return jpeg(image.convert("RGB"), exif=exif.tobytes())


def encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def test_what_the_device_path_leaves_to_pillow(photos: dict[str, Path]) -> None:
    with Image.open(photos["coffee"]) as opened:
        photo = opened.convert("RGB")
    plain = jpeg(photo)
    assert inspect_jpeg(plain) == JpegHeader(*photo.size)
    assert frame_marker(plain) == 0xC0
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    refused = {
        "orientation 6": rotated(photos["coffee"]),
        "not a JPEG": encoded(photo, "PNG"),
        "not a baseline JPEG (start of frame 0xC2)": jpeg(photo, progressive=True),
        "mode L": jpeg(photo.convert("L")),
        "mode CMYK": jpeg(photo.convert("CMYK")),
        "colour profile": jpeg(photo, icc_profile=profile),
        "end-of-image": plain[: len(plain) // 2],
        "outside 1 to": b"",
    }
    for reason, data in refused.items():
        why = inspect_jpeg(data)
        assert isinstance(why, str) and reason in why, (reason, why)
    small = ImageLimits(max_pixels=photo.size[0] * photo.size[1] - 1)
    assert "over a size limit" in str(inspect_jpeg(plain, small))


def test_an_image_the_device_fails_on_is_left_to_pillow(photos: dict[str, Path]) -> None:
    with Image.open(photos["rocket"]) as opened:
        good = jpeg(opened.convert("RGB"))
    header = inspect_jpeg(good)
    assert isinstance(header, JpegHeader)
    # A header that passes, then no decodable scan: the batch fails, then this image alone.
    broken = good[:200] + b"\xff\xd9"
    decoded = decode_jpeg_batch([(good, header), (broken, header), (good, header)], CENTRE, "cpu")
    assert decoded[1] is None
    assert all(isinstance(d, DeviceDecoded) for d in (decoded[0], decoded[2]))
    with pytest.raises(ValueError, match="nearest"):
        decode_jpeg_batch(
            [(good, header)], InputSpec(224, 224, 256, interpolation="nearest"), "cpu"
        )


def test_no_device_decode_on_the_cpu() -> None:
    assert device_decode_refusal("cpu") == "cpu is not a CUDA device"


def test_prepare_batch_decodes_what_it_takes_and_hands_the_rest_to_pillow(
    photos: dict[str, Path],
) -> None:
    with Image.open(photos["chelsea"]) as opened:
        photo = opened.convert("RGB")
    images: dict[str, bytes | Exception | None] = {
        "jpeg": jpeg(photo),
        "png": encoded(photo, "PNG"),
        "rotated": rotated(photos["chelsea"]),
        "missing": NotFound("no such object"),
        "failed at submission": None,
        "truncated": jpeg(photo)[:5000],
        "second jpeg": jpeg(photo.resize((1024, 768))),
    }
    limits = ImageLimits()

    def fetch(value: bytes | Exception) -> Callable[[], bytes]:
        def read() -> bytes:
            if isinstance(value, Exception):
                raise value
            return value

        return read

    def prepare(
        fetched: Callable[[], bytes], decoded: DeviceDecoded | None, name: str
    ) -> tuple[str, str, np.ndarray | None]:
        if images[name] is None:
            return name, "failed already", None
        try:
            data = fetched()
            if decoded is not None:
                return name, "device", decoded.with_quality(CENTRE)[0]
            return name, "pillow", load_model_input_with_info(data, CENTRE, limits)[0]
        except (NotFound, InvalidImage) as error:
            return name, error.reason, None

    names = list(images)

    def prepare_for(name: str) -> Callable[[Callable[[], bytes], DeviceDecoded | None], Any]:
        return lambda fetched, decoded: prepare(fetched, decoded, name)

    for threads in (1, 3):
        with ThreadPoolExecutor(threads) as pool:
            futures = prepare_batch(
                pool,
                [None if images[n] is None else fetch(images[n]) for n in names],  # type: ignore[arg-type]
                [prepare_for(name) for name in names],
                CENTRE,
                limits,
                "cpu",
            )
            results = [future.result(timeout=60) for future in futures]
        assert [(name, how) for name, how, _ in results] == [
            ("jpeg", "device"),
            ("png", "pillow"),
            ("rotated", "pillow"),
            ("missing", "NOT_FOUND"),
            ("failed at submission", "failed already"),
            ("truncated", "TRUNCATED"),
            ("second jpeg", "device"),
        ]
        device_pixels = results[0][2]
        pillow_pixels = load_model_input_with_info(images["jpeg"], CENTRE)[0]  # type: ignore[arg-type]
        assert device_pixels is not None
        assert np.abs(device_pixels.astype(int) - pillow_pixels.astype(int)).max() <= 1


def test_prepare_batch_of_nothing() -> None:
    with ThreadPoolExecutor(1) as pool:
        assert prepare_batch(pool, [], [], CENTRE, ImageLimits(), "cpu") == []
