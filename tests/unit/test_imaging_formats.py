"""Every format phones and cameras write decodes like the JPEG of the same pixels: HEIC, AVIF
and MPO from the repo's real photos, colour profiles (Adobe RGB, Display P3) brought to sRGB,
animations reduced to their first frame and saying so, EXIF orientation in every format, and
16-bit images decoded in bounded memory."""

from __future__ import annotations

import io
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from perito_core.errors import InvalidImage
from perito_core.imaging import (
    ACCEPTED_FORMATS,
    ACCEPTED_FORMATS_TEXT,
    ImageLimits,
    InputSpec,
    decode_image,
    decode_image_with_info,
    load_model_input,
)

# The demo model's preprocessing (EfficientNet-Lite0): what a model would actually see.
LITE0_SPEC = InputSpec(
    height=224, width=224, resize_size=256, resize_mode="center_crop", interpolation="bicubic"
)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def pixels_of(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def model_input(data: bytes) -> np.ndarray:
    return load_model_input(data, LITE0_SPEC).astype(np.int16)


# --- ICC profiles, written here: Pillow ships only sRGB, and no Adobe RGB / P3 file exists
# offline. A v2 matrix/TRC display profile is the header, a tag table, and nine small tags
# (ICC.1:2001-04: desc, cprt, wtpt, r/g/bXYZ, r/g/bTRC); primaries are adapted to the D50
# connection space with the Bradford transform, as the spec asks.

D50 = (0.9642, 1.0, 0.8249)
BRADFORD = np.array(
    [[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]]
)


def _s15fixed16(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz_tag(xyz: tuple[float, ...] | np.ndarray) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15fixed16(float(v)) for v in xyz)


def _description_tag(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    return (
        b"desc\0\0\0\0"
        + struct.pack(">I", len(ascii_text))
        + ascii_text
        + struct.pack(">IIHB", 0, 0, 0, 0)
        + b"\0" * 67
    )


def gamma_curve(gamma: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))


def srgb_curve(points: int = 1024) -> bytes:
    x = np.linspace(0.0, 1.0, points)
    y = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    table = np.round(y * 65535).astype(">u2").tobytes()
    return b"curv\0\0\0\0" + struct.pack(">I", points) + table


def rgb_profile(
    description: str,
    primaries: tuple[tuple[float, float], ...],
    curve: bytes,
    white: tuple[float, float] = (0.3127, 0.3290),  # D65
) -> bytes:
    def xyz(x: float, y: float) -> np.ndarray:
        return np.array([x / y, 1.0, (1 - x - y) / y])

    matrix = np.stack([xyz(*p) for p in primaries], axis=1)
    white_xyz = xyz(*white)
    matrix = matrix * np.linalg.solve(matrix, white_xyz)  # R = G = B = 1 is the white
    gain = (BRADFORD @ np.array(D50)) / (BRADFORD @ white_xyz)
    matrix = np.linalg.inv(BRADFORD) @ np.diag(gain) @ BRADFORD @ matrix
    tags = [
        (b"desc", _description_tag(description)),
        (b"cprt", b"text\0\0\0\0No copyright, test data\0"),
        (b"wtpt", _xyz_tag(D50)),
        (b"rXYZ", _xyz_tag(matrix[:, 0])),
        (b"gXYZ", _xyz_tag(matrix[:, 1])),
        (b"bXYZ", _xyz_tag(matrix[:, 2])),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        table += struct.pack(">4sII", signature, offset + len(data), len(body))
        data += body + b"\0" * (-len(body) % 4)
    header = (
        struct.pack(">I4sI4s4s", offset + len(data), b"\0" * 4, 0x02100000, b"mntr", b"RGB ")
        + b"XYZ "
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\0" * 28
        + b"".join(_s15fixed16(v) for v in D50)
        + b"\0" * 48
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


ADOBE_RGB = rgb_profile(
    "Adobe RGB (1998) compatible",
    ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06)),
    gamma_curve(563 / 256),  # 2.19921875, the Adobe RGB (1998) specification's gamma
)
DISPLAY_P3 = rgb_profile(
    "Display P3 compatible", ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060)), srgb_curve()
)


def in_profile(image: Image.Image, icc: bytes) -> Image.Image:
    """`image` (sRGB) re-expressed in the colour space of `icc`, as a camera would save it."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    transform = ImageCms.buildTransform(
        SRGB, profile, "RGB", "RGB", renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC
    )
    converted = ImageCms.applyTransform(image, transform)
    assert converted is not None
    converted.info.pop("icc_profile", None)
    return converted


def test_the_profile_writer_makes_profiles_littlecms_reads_as_written() -> None:
    # An sRGB built with the same writer must be LittleCMS's own sRGB: a check on the writer.
    own_srgb = rgb_profile("own sRGB", ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06)), srgb_curve())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    assert np.array_equal(np.asarray(in_profile(image, own_srgb)), np.asarray(image))


# --- formats


def test_the_accepted_formats_are_one_list_named_in_the_error() -> None:
    assert set(ACCEPTED_FORMATS) == {
        "JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF"
    }  # fmt: skip
    with pytest.raises(InvalidImage) as caught:
        decode_image(b"%PDF-1.7 a claim form, not a photo")
    assert caught.value.reason == "NOT_AN_IMAGE"
    assert ACCEPTED_FORMATS_TEXT in caught.value.message
    for name in ("JPEG", "MPO", "PNG", "WebP", "GIF", "BMP", "TIFF", "HEIC", "AVIF"):
        assert name in caught.value.message


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX"])
def test_formats_pillow_reads_but_we_do_not_accept_are_not_images(fmt: str) -> None:
    data = encode(Image.new("RGB", (32, 32), (200, 30, 30)), fmt)
    Image.open(io.BytesIO(data)).load()  # Pillow itself would read it
    with pytest.raises(InvalidImage) as caught:
        decode_image(data)
    assert caught.value.reason == "NOT_AN_IMAGE"


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "WEBP", "PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.02, 0.5, 0.99])
def test_a_cut_short_phone_photo_is_damaged_not_an_unknown_format(
    photos: dict[str, Path], fmt: str, keep: float
) -> None:
    data = encode(pixels_of(photos["coffee"]), fmt)
    with pytest.raises(InvalidImage) as caught:
        decode_image(data[: int(len(data) * keep)])
    assert caught.value.reason in ("TRUNCATED", "CORRUPT")


def test_text_is_not_an_image_even_when_it_starts_like_a_bitmap() -> None:
    with pytest.raises(InvalidImage) as caught:
        decode_image(b"BMW 320d, rear bumper, claim 1234\n")
    assert caught.value.reason == "NOT_AN_IMAGE"


@pytest.mark.parametrize(
    ("fmt", "params", "mean_limit"),
    [
        ("HEIF", {"quality": 95}, 1.5),
        ("AVIF", {"quality": 95}, 1.5),
        ("PNG", {}, 0.0),
        ("WEBP", {"lossless": True}, 0.0),
        ("TIFF", {}, 0.0),
    ],
)
@pytest.mark.parametrize("name", ["coffee", "chelsea", "china"])
def test_each_format_of_a_real_photo_gives_the_model_what_its_jpeg_gives(
    photos: dict[str, Path], name: str, fmt: str, params: dict[str, object], mean_limit: float
) -> None:
    jpeg = photos[name].read_bytes()
    other = encode(pixels_of(photos[name]), fmt, **params)
    image, info = decode_image_with_info(other)
    assert info.format == fmt and info.frames == 1 and not info.first_frame_only
    assert image.mode == "RGB" and image.size == pixels_of(photos[name]).size
    difference = np.abs(model_input(other) - model_input(jpeg))
    # Lossless formats: the very same model input. HEIC / AVIF re-encode the photo (lossy,
    # measured: mean 0.4-1.2/255, 99th percentile 3-6): a re-encoding's noise, no more.
    assert difference.mean() <= mean_limit
    assert np.percentile(difference, 99) <= (0 if mean_limit == 0 else 8)


def test_an_mpo_is_its_first_picture_decoded_as_fast_as_a_jpeg(photos: dict[str, Path]) -> None:
    primary = pixels_of(photos["coffee"]).resize((2000, 1500))
    depth_map = Image.new("RGB", (500, 375), (0, 0, 0))
    mpo = encode(primary, "MPO", quality=92, save_all=True, append_images=[depth_map])
    jpeg = encode(primary, "JPEG", quality=92)
    image, info = decode_image_with_info(mpo)
    assert (info.format, info.frames, info.first_frame_only) == ("MPO", 2, False)
    assert np.array_equal(np.asarray(image), np.asarray(decode_image(jpeg)))
    # The DCT-scaled decode applies to MPO as to JPEG: the same reduced size, the same pixels.
    small, _ = decode_image_with_info(mpo, min_size=(256, 256))
    assert small.size == decode_image(jpeg, min_size=(256, 256)).size == (500, 375)
    assert np.array_equal(np.asarray(small), np.asarray(decode_image(jpeg, min_size=(256, 256))))
    assert np.array_equal(model_input(mpo), model_input(jpeg))


def test_a_heic_is_decoded_whole_never_from_its_embedded_thumbnail(
    photos: dict[str, Path],
) -> None:
    # A thumbnail is a separate, lower-fidelity picture (libheif makes them by nearest
    # neighbour): a model must see the photo itself, whatever the file carries besides.
    photo = pixels_of(photos["chelsea"]).resize((800, 600))
    with_thumbnail = encode(photo, "HEIF", quality=90, thumbnails=[512])
    image, info = decode_image_with_info(with_thumbnail, min_size=(256, 256))
    assert info.format == "HEIF" and image.size == (800, 600)


@pytest.mark.parametrize("fmt", ["JPEG", "MPO", "HEIF", "AVIF", "WEBP", "PNG", "TIFF"])
def test_exif_orientation_is_applied_in_every_format(fmt: str) -> None:
    wide = Image.new("RGB", (60, 20), (255, 255, 255))
    wide.paste((255, 0, 0), (0, 0, 10, 20))  # red at the left edge, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    params: dict[str, object] = {"exif": exif.tobytes()}
    if fmt == "MPO":
        params.update(save_all=True, append_images=[wide])
    if fmt in ("PNG", "WEBP", "TIFF"):
        params["exif"] = exif
    image = decode_image(encode(wide, fmt, **params))
    assert image.size == (20, 60)
    red, green, _ = image.getpixel((10, 3))  # type: ignore[misc]
    assert red > 200 and green < 80  # the stored left edge is now the top


# --- colour profiles


@pytest.mark.parametrize(("space", "icc"), [("Adobe RGB", ADOBE_RGB), ("Display P3", DISPLAY_P3)])
@pytest.mark.parametrize("name", ["coffee", "chelsea", "flower"])
def test_wide_gamut_photos_reach_the_model_as_srgb(
    photos: dict[str, Path], name: str, space: str, icc: bytes
) -> None:
    original = pixels_of(photos[name])
    reference = model_input(encode(original, "PNG"))
    wide = in_profile(original, icc)
    tagged = model_input(encode(wide, "PNG", icc_profile=icc))
    untagged = model_input(encode(wide, "PNG"))
    # Read as sRGB, the wide-gamut pixels are visibly off (what the model saw before) ...
    assert np.abs(untagged - reference).max() >= 15, space
    # ... converted, they are the original's to within 8-bit rounding: an 8-bit Adobe RGB /
    # P3 value spans up to ~1.5 sRGB steps in saturated colours, so a few pixels of the
    # resized input land 3-4 levels off while 99.9% stay within 2/255.
    difference = np.abs(tagged - reference)
    assert difference.mean() <= 0.3
    assert np.percentile(difference, 99.9) <= 2
    assert difference.max() <= 4
    _, info = decode_image_with_info(encode(wide, "PNG", icc_profile=icc))
    assert info.icc_converted


@pytest.mark.parametrize("icc", [ADOBE_RGB, DISPLAY_P3])
def test_a_wide_gamut_jpeg_reaches_the_model_as_srgb(photos: dict[str, Path], icc: bytes) -> None:
    original = pixels_of(photos["coffee"])
    reference = model_input(encode(original, "JPEG", quality=95))
    wide = in_profile(original, icc)
    tagged = np.abs(model_input(encode(wide, "JPEG", quality=95, icc_profile=icc)) - reference)
    untagged = np.abs(model_input(encode(wide, "JPEG", quality=95)) - reference)
    # Two lossy encodings of different pixel values differ by their compression noise; the
    # colour error they would carry without the conversion is several times larger.
    assert tagged.mean() <= 1.2 < 4 <= untagged.mean()


def test_an_srgb_profile_is_left_alone_and_a_broken_one_does_not_cost_the_image() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), np.uint8))
    srgb_bytes = SRGB.tobytes()
    for icc in (srgb_bytes, b"this is not an ICC profile", ADOBE_RGB[:200]):
        decoded, info = decode_image_with_info(encode(image, "PNG", icc_profile=icc))
        assert not info.icc_converted
        assert np.array_equal(np.asarray(decoded), np.asarray(image))
    # A colour profile on a greyscale image does not fit it: the pixels are used as stored.
    grey = Image.new("L", (30, 30), 90)
    decoded, info = decode_image_with_info(encode(grey, "PNG", icc_profile=DISPLAY_P3))
    assert not info.icc_converted and decoded.getpixel((0, 0)) == (90, 90, 90)


def test_a_profile_on_an_image_with_alpha_is_converted_then_composited_on_white() -> None:
    red = in_profile(Image.new("RGB", (16, 16), (200, 40, 40)), ADOBE_RGB)
    rgba = red.convert("RGBA")
    rgba.putalpha(255)
    rgba.paste((0, 0, 0, 0), (0, 0, 8, 16))  # the left half fully transparent
    decoded, info = decode_image_with_info(encode(rgba, "PNG", icc_profile=ADOBE_RGB))
    assert info.icc_converted
    assert decoded.getpixel((2, 2)) == (255, 255, 255)
    assert np.abs(np.subtract(decoded.getpixel((12, 8)), (200, 40, 40))).max() <= 2  # type: ignore[arg-type]


# --- animations


def frames(count: int) -> list[Image.Image]:
    colours = [(220, 20, 20), (20, 20, 220), (20, 220, 20)]
    return [Image.new("RGB", (40, 30), colours[i % 3]) for i in range(count)]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_an_animation_gives_its_first_frame_and_says_so(fmt: str) -> None:
    first, *rest = frames(3)
    params: dict[str, object] = {"save_all": True, "append_images": rest, "duration": 100}
    if fmt == "WEBP":
        params["lossless"] = True
    image, info = decode_image_with_info(encode(first, fmt, **params))
    assert info.format == fmt and info.frames == 3 and info.first_frame_only
    red, green, blue = image.getpixel((5, 5))  # type: ignore[misc]
    assert red > 200 and green < 40 and blue < 40
    still_params = {"lossless": True} if fmt == "WEBP" else {}
    still, still_info = decode_image_with_info(encode(first, fmt, **still_params))
    assert still_info.frames == 1 and not still_info.first_frame_only
    assert still.getpixel((5, 5)) == image.getpixel((5, 5))


def test_a_multi_page_tiff_gives_its_first_page_and_says_so() -> None:
    first, *rest = frames(2)
    image, info = decode_image_with_info(encode(first, "TIFF", save_all=True, append_images=rest))
    assert (info.format, info.frames, info.first_frame_only) == ("TIFF", 2, True)
    assert image.getpixel((0, 0)) == (220, 20, 20)


# --- bit depths and memory


def test_float_and_32_bit_greyscale_are_scaled_to_8_bits() -> None:
    ramp = np.linspace(0.0, 1.0, 256, dtype=np.float32).reshape(16, 16)
    ramp[0, 0] = np.nan
    image = decode_image(encode(Image.fromarray(ramp), "TIFF"))
    values = np.asarray(image)[..., 0]
    assert values[0, 0] == 0 and values[0, 1] == 1 and values[-1, -1] == 255
    over = ramp.copy()
    over[-1, -1] = 1.5  # over 1: clipped there, the rest scaled as before
    same = np.asarray(decode_image(encode(Image.fromarray(over), "TIFF")))[..., 0]
    assert np.array_equal(same, values)
    sixteen_bit_range = np.full((8, 8), 65535, dtype=np.int32)
    sixteen_bit_range[0, 0] = 32768
    image = decode_image(encode(Image.fromarray(sixteen_bit_range), "TIFF"))
    assert np.asarray(image)[0, 0].tolist() == [128, 128, 128]
    assert np.asarray(image)[1, 1].tolist() == [255, 255, 255]


@pytest.mark.slow
def test_a_16_bit_8000x8000_png_decodes_in_bounded_memory() -> None:
    side = 8000
    row = np.linspace(0, 65535, side, dtype=np.uint16)
    gradient = Image.fromarray(np.broadcast_to(row, (side, side)).copy())
    assert gradient.mode == "I;16"
    data = encode(gradient, "PNG", compress_level=1)
    del gradient
    output_bytes = side * side * 3  # the 8-bit RGB image the decode returns: 192 MB
    tracemalloc.start()
    try:
        image = decode_image(data, ImageLimits(max_pixels=side * side))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.size == (side, side) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((side - 1, 0)) == (255,) * 3
    # numpy's buffers are traced: the only whole-image one left is the 8-bit grey plane
    # (a third of the output) plus strips of about 1M pixels. The float64 path this replaced
    # peaked near 8x the output (1.5 GB: a float64 copy and two float64 temporaries).
    assert peak < output_bytes / 2, f"peak {peak / 1e6:.0f} MB"


@pytest.mark.slow
def test_heic_avif_and_mpo_of_real_photos_classify_like_their_jpeg(
    photos: dict[str, Path],
) -> None:
    torch = pytest.importorskip("torch")
    from perito_training.export import ImageClassifier
    from perito_training.pretrained import EFFICIENTNET_LITE0_INPUT, efficientnet_lite0_imagenet

    network, _ = efficientnet_lite0_imagenet()
    classifier = ImageClassifier(network, EFFICIENTNET_LITE0_INPUT).eval()

    def probabilities(data: bytes) -> np.ndarray:
        batch = torch.from_numpy(load_model_input(data, LITE0_SPEC)).permute(2, 0, 1)[None]
        with torch.inference_mode():
            return classifier(batch.contiguous())[0].numpy()  # type: ignore[no-any-return]

    for name in ("coffee", "chelsea", "rocket"):
        jpeg = photos[name].read_bytes()
        pixels = pixels_of(photos[name])
        expected = probabilities(jpeg)
        for data in (
            encode(pixels, "HEIF", quality=90),
            encode(pixels, "AVIF", quality=90),
            encode(pixels, "MPO", quality=92, save_all=True, append_images=[pixels]),
        ):
            got = probabilities(data)
            assert got.argmax() == expected.argmax(), name
            assert abs(got.max() - expected.max()) < 0.05, name
