"""Every kind of bad input (empty, not an image, truncated, too large, a decompression bomb,
absurd dimensions) gets a clear `InvalidImage`, and odd-but-valid images (CMYK, 16-bit,
palette, alpha, EXIF-rotated) come out as upright 8-bit RGB."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from perito_core.errors import InvalidImage
from perito_core.imaging import ImageLimits, InputSpec, decode_image, load_model_input


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo(width: int = 64, height: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reason_for(data: bytes, limits: ImageLimits = ImageLimits()) -> str:
    with pytest.raises(InvalidImage) as caught:
        decode_image(data, limits)
    return caught.value.reason


def test_empty_bytes() -> None:
    assert reason_for(b"") == "EMPTY"


def test_bytes_that_are_not_an_image() -> None:
    assert reason_for(b"%PDF-1.7 this is a claim form, not a photo") == "NOT_AN_IMAGE"


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_jpeg(keep: float) -> None:
    data = encode(photo(640, 480), "JPEG", quality=90)
    assert reason_for(data[: int(len(data) * keep)]) == "TRUNCATED"


@pytest.mark.parametrize("keep", [0.5, 0.2])
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_jpeg_cut_short_with_an_end_marker_after_the_cut_is_truncated(
    keep: float, progressive: bool, mode: str
) -> None:
    """libjpeg only warns when the scan data ends early at an end marker, filling the rest in
    grey; Pillow then decodes it as whole. Cut within the first scan, it is refused."""
    data = encode(photo(640, 480).convert(mode), "JPEG", quality=90, progressive=progressive)
    scan = data.index(b"\xff\xda")  # the first scan's header
    end = data.find(b"\xff\xda", scan + 2) if progressive else len(data) - 2
    cut = data[: scan + int((end - scan) * keep)] + b"\xff\xd9"
    assert reason_for(cut) == "TRUNCATED"


def test_a_whole_jpeg_whose_bottom_is_mid_grey_is_read() -> None:
    pixels = np.asarray(photo(64, 48)).copy()
    pixels[-16:] = 128  # the grey libjpeg fills a cut-short scan with, really in the photo
    data = encode(Image.fromarray(pixels), "JPEG", quality=95)
    image = decode_image(data)
    assert image.size == (64, 48)
    assert np.asarray(image)[-1].tolist() == [[128, 128, 128]] * 64


def test_oversized_file() -> None:
    assert reason_for(encode(photo()), ImageLimits(max_bytes=100)) == "TOO_LARGE"


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # 12,000 x 12,000 one-bit pixels: a ~20 KB file that would decode to 144 megapixels.
    bomb = encode(Image.new("1", (12_000, 12_000)))
    assert len(bomb) < 100_000
    assert reason_for(bomb) == "DECOMPRESSION_BOMB"


def test_a_header_past_pillows_own_bound_is_refused_in_peritos_words() -> None:
    """A PNG header naming 2,147,483,647 x 1 pixels: Pillow refuses it as it opens, before
    Perito's limits are looked at; the caller reads Perito's limit, not Pillow's 178956970."""
    header = encode(Image.new("L", (1, 1)))
    png = bytearray(header)
    png[16:20] = (2_147_483_647).to_bytes(4, "big")  # IHDR width
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")  # IHDR's CRC
    with pytest.raises(InvalidImage) as refused:
        decode_image(bytes(png))
    assert refused.value.reason == "DECOMPRESSION_BOMB"
    assert refused.value.message == (
        "image is 2,147,483,647 pixels; the limit is 64,000,000 (a possible decompression bomb)"
    )


@pytest.mark.parametrize("size", [(4000, 20), (20, 4000), (25_000, 1000)])
def test_absurd_dimensions(size: tuple[int, int]) -> None:
    assert reason_for(encode(Image.new("L", size))) == "BAD_DIMENSIONS"


def test_cmyk_jpeg_becomes_rgb_with_its_colour() -> None:
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    image = decode_image(encode(cmyk, "JPEG", quality=95))
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((16, 16))  # type: ignore[misc]
    assert red > 200 and green < 60 and blue < 60


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    grey = np.full((16, 16), 32_768, dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(grey)))
    assert image.mode == "RGB"
    assert np.asarray(image)[0, 0].tolist() == [128, 128, 128]


def test_16_bit_greyscale_is_scaled_the_same_way_whatever_its_range() -> None:
    """A 16-bit image whose values stay under 256 is near black, as it is, and one pixel
    over 255 changes nothing else (it was once read as 8-bit data in a 16-bit container)."""
    dark = np.full((16, 16), 200, dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(dark)))
    assert np.asarray(image)[5, 5].tolist() == [1, 1, 1]
    dark[0, 0] = 256
    assert np.array_equal(
        np.asarray(decode_image(encode(Image.fromarray(dark))))[1:], np.asarray(image)[1:]
    )


def test_palette_image_with_transparency_goes_over_white() -> None:
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    image = decode_image(encode(palette))
    assert np.asarray(image)[0, 0].tolist() == [255, 255, 255]


def test_alpha_is_composited_over_white() -> None:
    half_red = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    pixel = np.asarray(decode_image(encode(half_red)))[0, 0].tolist()
    assert pixel[0] == 255 and 120 <= pixel[1] <= 135 and pixel[1] == pixel[2]


def test_exif_orientation_is_applied() -> None:
    wide = photo(60, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    image = decode_image(encode(wide, "JPEG", exif=exif.tobytes()))
    assert image.size == (20, 60)


def test_greyscale_gif_webp_and_bmp_decode() -> None:
    for fmt in ("GIF", "WEBP", "BMP"):
        assert decode_image(encode(photo(), fmt)).mode == "RGB"
    assert decode_image(encode(Image.new("L", (10, 10), 7))).getpixel((0, 0)) == (7, 7, 7)


def test_large_jpeg_uses_reduced_scale_decoding_but_keeps_enough_pixels() -> None:
    image = decode_image(encode(photo(2000, 1500), "JPEG"), min_size=(256, 256))
    assert min(image.size) >= 256
    assert image.size[0] <= 1000  # decoded at 1/2 scale or less, not 2000 wide


def test_center_crop_input_is_exactly_the_model_size() -> None:
    spec = InputSpec(height=224, width=224, resize_size=256, resize_mode="center_crop")
    array = load_model_input(encode(photo(640, 480), "JPEG"), spec)
    assert array.shape == (224, 224, 3) and array.dtype == np.uint8


def test_squash_input_keeps_the_whole_image() -> None:
    spec = InputSpec(height=28, width=28, resize_size=28, resize_mode="squash")
    left_black_right_white = np.zeros((10, 100, 3), dtype=np.uint8)
    left_black_right_white[:, 50:] = 255
    array = load_model_input(encode(Image.fromarray(left_black_right_white)), spec)
    assert array.shape == (28, 28, 3)
    assert array[:, 0].max() < 30 and array[:, -1].min() > 225
