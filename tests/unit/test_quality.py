"""The photo-quality gate's measures and verdicts (perito_core.quality), on generated blurred,
dark, bright, tiny and uniform photos and on real sample photos (scikit-image, scikit-learn),
which must pass clean; and the measures `load_model_input_with_info` returns with a decode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from perito_core.imaging import InputSpec, load_model_input_with_info
from perito_core.models.card import QualityThresholds
from perito_core.quality import (
    BLURRY,
    DEFAULT_THRESHOLDS,
    LOW_RESOLUTION,
    OVEREXPOSED,
    UNDEREXPOSED,
    UNIFORM,
    Quality,
    QualityMeasures,
    assess,
    fit_thresholds,
    measure,
)

skimage_data = pytest.importorskip("skimage.data")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

SIDE = 224  # the model's input side
NO_CARD = QualityThresholds()


def _rgb(pixels: np.ndarray) -> np.ndarray:
    return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels[:, :, :3]


def real_photos() -> dict[str, np.ndarray]:
    """Ordinary, well-taken photos: every one must pass the default thresholds."""
    photos = {
        name: _rgb(getattr(skimage_data, name)())
        for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon")
    }
    china, flower = sklearn_datasets.load_sample_images().images
    return {**photos, "china": china, "flower": flower}


PHOTOS = real_photos()


def issues_of(
    pixels: np.ndarray | Image.Image, card: QualityThresholds = NO_CARD
) -> tuple[str, ...]:
    return assess(measure(pixels, SIDE), card).issues


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_real_photos_pass_clean(name: str) -> None:
    assert issues_of(PHOTOS[name]) == ()


@pytest.mark.parametrize("name", ["astronaut", "coffee", "camera", "china"])
def test_a_blurred_photo_is_blurry_and_nothing_else(name: str) -> None:
    photo = Image.fromarray(PHOTOS[name])
    blurred = photo.filter(ImageFilter.GaussianBlur(3 * min(photo.size) / 256))
    assert measure(blurred, SIDE).sharpness < measure(photo, SIDE).sharpness / 20
    assert issues_of(blurred) == (BLURRY,)


def test_a_dark_photo_is_underexposed() -> None:
    dark = (PHOTOS["astronaut"].astype(np.float32) * 0.05).astype(np.uint8)
    measures = measure(dark, SIDE)
    assert measures.brightness < 10 and measures.dark_fraction > 0.6
    assert UNDEREXPOSED in issues_of(dark) and OVEREXPOSED not in issues_of(dark)
    # Less dark, most pixels above the clip level, its mean grey alone (9, under 25) tells.
    dim = (PHOTOS["astronaut"].astype(np.float32) * 0.08).astype(np.uint8)
    assert measure(dim, SIDE).dark_fraction < 0.6 and UNDEREXPOSED in issues_of(dim)


def test_a_washed_out_photo_is_overexposed() -> None:
    bright = np.clip(PHOTOS["coffee"].astype(np.float32) * 2.0 + 150, 0, 255).astype(np.uint8)
    measures = measure(bright, SIDE)
    assert measures.bright_fraction > 0.6
    assert OVEREXPOSED in issues_of(bright) and UNDEREXPOSED not in issues_of(bright)


def test_a_tiny_photo_is_low_resolution() -> None:
    tiny = Image.fromarray(PHOTOS["chelsea"]).resize((96, 64), Image.Resampling.BOX)
    measures = measure(tiny, SIDE)
    assert (measures.width, measures.height) == (96, 64)
    assert measures.resolution == pytest.approx(64 / SIDE)
    assert LOW_RESOLUTION in issues_of(tiny)
    assert issues_of(Image.fromarray(PHOTOS["chelsea"])) == ()


@pytest.mark.parametrize("level", [0, 128, 255])
def test_a_uniform_frame_is_uniform_not_blurry(level: int) -> None:
    flat = np.full((480, 640, 3), level, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(-2, 3, flat.shape)  # sensor noise, 1.4 levels
    frame = np.clip(flat.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    found = issues_of(frame)
    assert UNIFORM in found and BLURRY not in found
    assert (UNDEREXPOSED in found) == (level == 0) and (OVEREXPOSED in found) == (level == 255)


def test_the_measures_are_those_documented() -> None:
    # Left half black (0), right half white (255): a single vertical edge.
    pixels = np.zeros((300, 400, 3), dtype=np.uint8)
    pixels[:, 200:] = 255
    m = measure(pixels, 150)
    assert m.dark_fraction == pytest.approx(0.5, abs=0.01)
    assert m.bright_fraction == pytest.approx(0.5, abs=0.01)
    assert m.brightness == pytest.approx(127.5, abs=1.5)
    assert m.contrast == pytest.approx(127.5, abs=1.5)
    assert (m.width, m.height, m.resolution) == (400, 300, 2.0)
    # BT.601 luma, rounded to a whole level: pure green is brighter than pure red, which is
    # brighter than pure blue.
    levels = [measure(np.full((8, 8, 3), c, np.uint8), 8).brightness for c in np.eye(3) * 255]
    assert levels == pytest.approx([0.299 * 255, 0.587 * 255, 0.114 * 255], abs=0.5)


def test_a_request_override_changes_the_verdict() -> None:
    photo = Image.fromarray(PHOTOS["astronaut"])
    blurred = photo.filter(ImageFilter.GaussianBlur(6))
    measures = measure(blurred, SIDE)
    assert assess(measures, NO_CARD).issues == (BLURRY,)
    assert assess(measures, NO_CARD, QualityThresholds(min_sharpness=0.0)).issues == ()
    sharp = measure(photo, SIDE)
    assert assess(sharp, NO_CARD, QualityThresholds(min_sharpness=1e6)).issues == (BLURRY,)


def test_the_card_replaces_the_defaults_field_by_field() -> None:
    blurred = measure(Image.fromarray(PHOTOS["coffee"]).filter(ImageFilter.GaussianBlur(6)), SIDE)
    card = QualityThresholds(min_sharpness=0.5)  # a model trained on soft photos
    assert assess(blurred, card).issues == ()
    # Its other thresholds are still the defaults': a dark frame is still flagged.
    dark = measure(np.full((64, 64, 3), 3, np.uint8), 8)
    assert UNDEREXPOSED in assess(dark, card).issues
    # And a request's override beats the card.
    assert assess(blurred, card, QualityThresholds(min_sharpness=20.0)).issues == (BLURRY,)


def _measures(sharpness: float, dark: float = 0.0, resolution: float = 2.0) -> QualityMeasures:
    return QualityMeasures(sharpness, dark, 0.0, 120.0, 50.0, 448, 448, resolution)


def test_fit_takes_the_training_images_percentiles_never_stricter_than_the_defaults() -> None:
    sharpness = np.arange(1, 101, dtype=np.float64)
    dark = 0.7 + sharpness / 1000
    soft = [_measures(s, d) for s, d in zip(sharpness, dark, strict=True)]
    fitted = fit_thresholds(soft, "train split, 100 images")
    assert fitted.fitted_on == "train split, 100 images"
    # Trained on soft, dark photos: the bars move to what the model learned from.
    assert fitted.min_sharpness == pytest.approx(np.percentile(sharpness, 1), rel=1e-3)
    assert fitted.max_dark_fraction == pytest.approx(np.percentile(dark, 99), rel=1e-3)
    # Sharp, well-exposed training photos never make the defaults stricter.
    crisp = fit_thresholds([_measures(5000.0 + s) for s in range(50)], "train")
    assert crisp.min_sharpness == DEFAULT_THRESHOLDS.min_sharpness
    assert crisp.max_dark_fraction == DEFAULT_THRESHOLDS.max_dark_fraction
    assert crisp.min_resolution == DEFAULT_THRESHOLDS.min_resolution
    with pytest.raises(ValueError, match="at least one image"):
        fit_thresholds([], "train")


def test_quality_round_trips_as_a_recorded_result() -> None:
    quality = assess(measure(np.full((40, 60, 3), 2, np.uint8), SIDE), NO_CARD)
    recorded = quality.as_dict()
    assert recorded["issues"] == [UNDEREXPOSED, LOW_RESOLUTION, UNIFORM]
    assert Quality.from_dict(recorded).issues == quality.issues
    assert Quality.from_dict(recorded).measures.width == 60


def _jpeg(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, exif=exif)
    return buffer.getvalue()


def test_decoding_measures_the_full_photo_upright() -> None:
    spec = InputSpec(height=SIDE, width=SIDE, resize_size=256)
    photo = np.asarray(Image.fromarray(PHOTOS["coffee"]).resize((2400, 1600)))
    # A big JPEG is decoded at a reduced scale; its size is still the photo's.
    _, info = load_model_input_with_info(_jpeg(photo), spec)
    assert info.quality is not None
    assert (info.quality.width, info.quality.height) == (2400, 1600)
    assert info.quality.resolution == pytest.approx(1600 / SIDE)
    # EXIF orientation 6 (rotate 90): the upright photo is 1600 wide, 2400 high.
    _, rotated = load_model_input_with_info(_jpeg(photo, orientation=6), spec)
    assert rotated.quality is not None
    assert (rotated.quality.width, rotated.quality.height) == (1600, 2400)
    assert assess(info.quality, NO_CARD).issues == ()
    blurred = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(20)))
    _, soft = load_model_input_with_info(_jpeg(blurred), spec)
    assert soft.quality is not None and assess(soft.quality, NO_CARD).issues == (BLURRY,)


def test_a_null_threshold_is_absent_as_protobuf_json_reads_it() -> None:
    from perito_core.errors import InvalidArgument
    from perito_core.quality import parse_thresholds

    assert parse_thresholds({"min_sharpness": None}) is None
    parsed = parse_thresholds({"min_sharpness": None, "min_contrast": 3})
    assert parsed is not None and parsed.min_contrast == 3 and parsed.min_sharpness is None
    with pytest.raises(InvalidArgument, match="min_sharpness must be a finite number"):
        parse_thresholds({"min_sharpness": "soft"})
