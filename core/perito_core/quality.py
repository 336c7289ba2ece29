"""The photo-quality gate: cheap measures of a decoded photo, and the issues they show.

Every image a model classifies is measured from its decoded pixels before the model runs
(`perito_core.imaging.load_model_input_with_info` returns the measures with the decode
information), so that an answer can say when the photo was too poor to judge, and a request
can ask to refuse such photos (`POOR_QUALITY`) instead of spending the model on them.

The measures (`QualityMeasures`), all on the grey image (ITU-R BT.601 luma, levels 0-255):

- sharpness: the variance of the Laplacian (4-neighbour kernel) of the grey image scaled to
  `QUALITY_SIDE` pixels on its shorter side (Pech-Pacheco, Cristobal, Chamorro-Martinez and
  Fernandez-Valdivia, "Diatom autofocusing in brightfield microscopy: a comparative study",
  ICPR 2000). Scaling first makes it independent of the photo's pixel count and cheap: a
  blurred photo has few strong edges, so a low variance.
- dark_fraction, bright_fraction: the share of grey levels at most `DARK_LEVEL` or at least
  `BRIGHT_LEVEL` (clipped shadows or highlights).
- brightness, contrast: the mean and the standard deviation of the grey levels.
- width, height: the photo's size in pixels (EXIF orientation applied), and resolution: its
  shorter side over the model's input side (under 1: the model sees it enlarged).

The thresholds (`perito_core.models.card.QualityThresholds`) come from the model card (fitted
at training by `fit_thresholds`, or set by `perito models import`), else `DEFAULT_THRESHOLDS`,
each replaceable per request. docs/trust.md#quality says it all for users.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import ValidationError

from perito_core.errors import InvalidArgument
from perito_core.models.card import QualityThresholds

# The grey image is scaled to this many pixels on its shorter side before it is measured.
QUALITY_SIDE = 256
# Grey levels at or under / at or over these are clipped dark / bright.
DARK_LEVEL = 8
BRIGHT_LEVEL = 247

BLURRY = "BLURRY"
UNDEREXPOSED = "UNDEREXPOSED"
OVEREXPOSED = "OVEREXPOSED"
LOW_RESOLUTION = "LOW_RESOLUTION"
UNIFORM = "UNIFORM"
ISSUES: tuple[str, ...] = (BLURRY, UNDEREXPOSED, OVEREXPOSED, LOW_RESOLUTION, UNIFORM)
"""Every issue the gate names, in the order answers list them."""

POOR_QUALITY = "POOR_QUALITY"
"""The reason of a photo refused by the gate (`QualityPolicy` REFUSE)."""

POLICIES: tuple[str, ...] = ("flag", "refuse")
"""What a poor photo does: `flag` (answered, its issues named; the default) or `refuse`."""

THRESHOLD_FIELDS: tuple[str, ...] = (
    "min_sharpness",
    "max_dark_fraction",
    "max_bright_fraction",
    "min_brightness",
    "max_brightness",
    "min_resolution",
    "min_contrast",
)
"""The thresholds' names: `QualityThresholds`' fields, the request fields and parameters."""

DEFAULT_THRESHOLDS = QualityThresholds(
    min_sharpness=15.0,
    max_dark_fraction=0.6,
    max_bright_fraction=0.6,
    min_brightness=25.0,
    max_brightness=235.0,
    min_resolution=0.5,
    min_contrast=6.0,
)
"""The thresholds of a model whose card has none (an imported model without flags, or one
published before the gate): chosen to flag only photos anyone would retake. scikit-image's
and scikit-learn's sample photos (astronaut, coffee, chelsea, camera, coins, moon, china,
flower, ...) measure sharpness 149 to 5,000, contrast 13 to 81, brightness 61 to 164 and
clipped shares under 0.25, and pass every threshold; a Gaussian blur of sigma 2 pixels (at
256 pixels on the shorter side) brings them to sharpness 2 to 17, sigma 3 under 8. A photo
whose shadows or highlights clip most of the frame, whose mean grey is under 25 or over 235,
whose shorter side is under half the model's input (enlarged more than twice) or whose grey
levels vary by under 6 (a blank frame, a lens cap) is flagged. docs/trust.md#quality."""

# The percentiles of the training images' measures `fit_thresholds` takes.
FIT_LOW_PERCENTILE = 1.0
FIT_HIGH_PERCENTILE = 99.0


@dataclass(frozen=True)
class QualityMeasures:
    """What the gate measured of one photo (see the module docstring for each measure).

    Attributes:
        sharpness: variance of the Laplacian of the grey image at `QUALITY_SIDE`, levels^2.
        dark_fraction: share of grey levels <= `DARK_LEVEL`, in [0, 1].
        bright_fraction: share of grey levels >= `BRIGHT_LEVEL`, in [0, 1].
        brightness: mean grey level, 0-255.
        contrast: standard deviation of the grey levels, 0-255.
        width, height: the photo's size in pixels (after EXIF orientation).
        resolution: its shorter side divided by the model's input side.
    """

    sharpness: float
    dark_fraction: float
    bright_fraction: float
    brightness: float
    contrast: float
    width: int
    height: int
    resolution: float


@dataclass(frozen=True)
class Quality:
    """A photo's measures and the issues its thresholds found (`ISSUES`, in that order)."""

    measures: QualityMeasures
    issues: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        """The measures and issues as JSON-ready scalars and a list (results.jsonl's
        `quality`, the OIP response parameter); floats rounded to 4 significant places."""
        measures = self.measures
        return {
            "sharpness": _round(measures.sharpness),
            "dark_fraction": _round(measures.dark_fraction),
            "bright_fraction": _round(measures.bright_fraction),
            "brightness": _round(measures.brightness),
            "contrast": _round(measures.contrast),
            "width": measures.width,
            "height": measures.height,
            "resolution": _round(measures.resolution),
            "issues": list(self.issues),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Quality:
        """The inverse of `as_dict` (a recorded job result's `quality`).

        Raises:
            KeyError, TypeError, ValueError: `data` is not a recorded quality.
        """
        issues = data.get("issues") or []
        if not isinstance(issues, list):
            raise TypeError("quality issues must be a list")

        def number(name: str) -> float:
            value = data[name]
            if not isinstance(value, int | float):
                raise TypeError(f"quality {name} must be a number")
            return float(value)

        measures = QualityMeasures(
            sharpness=number("sharpness"),
            dark_fraction=number("dark_fraction"),
            bright_fraction=number("bright_fraction"),
            brightness=number("brightness"),
            contrast=number("contrast"),
            width=int(number("width")),
            height=int(number("height")),
            resolution=number("resolution"),
        )
        return cls(measures, tuple(str(issue) for issue in issues))


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def grey_levels(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image's grey levels (BT.601 luma, as Pillow's "L" conversion rounds them),
    scaled to `QUALITY_SIDE` pixels on its shorter side when larger (box filter: every source
    pixel counts once).

    Args:
        image: a PIL image in mode RGB, or a uint8 array [H, W, 3] (RGB).

    Returns:
        A uint8 array [h, w], levels 0-255, min(h, w) <= `QUALITY_SIDE`.
    """
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    grey = pil.convert("L")  # one channel first: the resize costs a third
    width, height = grey.size
    scale = QUALITY_SIDE / min(width, height)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        grey = grey.resize(size, Image.Resampling.BOX, reducing_gap=2.0)
    return np.asarray(grey, dtype=np.uint8)


def laplacian_variance(grey: np.ndarray) -> float:
    """The variance of the 4-neighbour Laplacian of `grey` ([H, W] levels) over its interior
    pixels: 0 for an image of fewer than 3 x 3 pixels."""
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0
    # In integers, exactly (each value within +-1020 fits int16; the sums in Python ints).
    levels = grey.astype(np.int16)
    laplacian = levels[:-2, 1:-1] + levels[2:, 1:-1]
    laplacian += levels[1:-1, :-2]
    laplacian += levels[1:-1, 2:]
    laplacian -= 4 * levels[1:-1, 1:-1]
    values = laplacian.ravel().astype(np.int64)
    count, total, squares = values.size, int(values.sum()), int(values @ values)
    return (count * squares - total * total) / (count * count)


def measure(
    image: Image.Image | np.ndarray,
    input_side: int,
    *,
    size: tuple[int, int] | None = None,
) -> QualityMeasures:
    """Measure one decoded photo (see the module docstring); a few milliseconds.

    Args:
        image: the decoded photo, a PIL image in mode RGB or a uint8 array [H, W, 3], upright
            (EXIF orientation applied); it may be a reduced-scale decode of the photo.
        input_side: the model's input side in pixels (the shorter of its height and width).
        size: the photo's full (width, height) when `image` is a reduced-scale decode of it;
            default: `image`'s own.

    Returns:
        The measures.
    """
    grey = grey_levels(image)
    if size is None:
        size = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
    width, height = size
    count = grey.size
    histogram = np.bincount(grey.ravel(), minlength=256)
    levels = np.arange(256, dtype=np.float64)
    brightness = float(histogram @ levels) / count
    variance = float(histogram @ (levels - brightness) ** 2) / count
    return QualityMeasures(
        sharpness=laplacian_variance(grey),
        dark_fraction=float(histogram[: DARK_LEVEL + 1].sum()) / count,
        bright_fraction=float(histogram[BRIGHT_LEVEL:].sum()) / count,
        brightness=brightness,
        contrast=variance**0.5,
        width=int(width),
        height=int(height),
        resolution=min(width, height) / max(1, input_side),
    )


def effective_thresholds(
    card: QualityThresholds, override: QualityThresholds | None = None
) -> QualityThresholds:
    """The thresholds a photo is judged by: each the request's `override` where it sets one,
    else the model card's, else `DEFAULT_THRESHOLDS`'."""
    merged = DEFAULT_THRESHOLDS.model_dump()
    merged.update(card.model_dump(include=set(QualityThresholds.model_fields)))
    if override is not None:
        merged.update(override.model_dump(include=set(QualityThresholds.model_fields)))
    merged = {key: value for key, value in merged.items() if value is not None}
    return QualityThresholds.model_validate(merged)


def find_issues(measures: QualityMeasures, thresholds: QualityThresholds) -> tuple[str, ...]:
    """The issues `measures` show against `thresholds` (a threshold left unset checks
    nothing), in `ISSUES` order.

    BLURRY: sharpness under `min_sharpness`; UNDEREXPOSED: dark_fraction over
    `max_dark_fraction` or brightness under `min_brightness`; OVEREXPOSED: bright_fraction over
    `max_bright_fraction` or brightness over `max_brightness`; LOW_RESOLUTION: resolution under
    `min_resolution`; UNIFORM: contrast under `min_contrast`. A UNIFORM photo is not also
    called BLURRY: with no detail there is no focus to judge.
    """
    t = thresholds

    def under(value: float, bound: float | None) -> bool:
        return bound is not None and value < bound

    def over(value: float, bound: float | None) -> bool:
        return bound is not None and value > bound

    uniform = under(measures.contrast, t.min_contrast)
    found = {
        BLURRY: not uniform and under(measures.sharpness, t.min_sharpness),
        UNDEREXPOSED: over(measures.dark_fraction, t.max_dark_fraction)
        or under(measures.brightness, t.min_brightness),
        OVEREXPOSED: over(measures.bright_fraction, t.max_bright_fraction)
        or over(measures.brightness, t.max_brightness),
        LOW_RESOLUTION: under(measures.resolution, t.min_resolution),
        UNIFORM: uniform,
    }
    return tuple(issue for issue in ISSUES if found[issue])


def assess(
    measures: QualityMeasures,
    card: QualityThresholds,
    override: QualityThresholds | None = None,
) -> Quality:
    """`measures` and their issues against the effective thresholds (`effective_thresholds`)."""
    return Quality(measures, find_issues(measures, effective_thresholds(card, override)))


def fit_thresholds(measures: Sequence[QualityMeasures], fitted_on: str) -> QualityThresholds:
    """Thresholds fitted to a training set's own photos, for its model card.

    Each is the training images' `FIT_LOW_PERCENTILE` (for a minimum) or
    `FIT_HIGH_PERCENTILE` (for a maximum) percentile, but never stricter than
    `DEFAULT_THRESHOLDS`: the training images can show that the model learned from darker,
    softer or smaller photos than the defaults allow (and relax them), never that a photo
    anyone would accept is poor.

    Args:
        measures: the measures of the training images (at least one).
        fitted_on: which images, for the card (`train split, 1200 images`).

    Returns:
        The thresholds, with `fitted_on` set.

    Raises:
        ValueError: `measures` is empty.
    """
    if not measures:
        raise ValueError("fit_thresholds needs the measures of at least one image")

    def column(name: str) -> np.ndarray:
        return np.array([getattr(m, name) for m in measures], dtype=np.float64)

    def low(name: str, default: float | None) -> float:
        value = float(np.percentile(column(name), FIT_LOW_PERCENTILE))
        return _round(value if default is None else min(value, default))

    def high(name: str, default: float | None) -> float:
        value = float(np.percentile(column(name), FIT_HIGH_PERCENTILE))
        return _round(value if default is None else max(value, default))

    d = DEFAULT_THRESHOLDS
    return QualityThresholds(
        min_sharpness=low("sharpness", d.min_sharpness),
        max_dark_fraction=high("dark_fraction", d.max_dark_fraction),
        max_bright_fraction=high("bright_fraction", d.max_bright_fraction),
        min_brightness=low("brightness", d.min_brightness),
        max_brightness=high("brightness", d.max_brightness),
        min_resolution=low("resolution", d.min_resolution),
        min_contrast=low("contrast", d.min_contrast),
        fitted_on=fitted_on,
    )


@dataclass(frozen=True)
class QualityGate:
    """What a request asks of the gate: `refuse` poor photos (else flag them), judged by the
    card's thresholds with `override`'s in their place where it sets them."""

    refuse: bool = False
    override: QualityThresholds | None = None


FLAG_ONLY = QualityGate()
"""The default gate: flag poor photos by the card's thresholds."""


def explain_issues(quality: Quality, thresholds: QualityThresholds) -> str:
    """The issues in words with the measure and threshold behind each, for a refusal:
    `BLURRY (sharpness 3.1, under 15), UNIFORM (contrast 0.8, under 6)`."""
    m, t = quality.measures, thresholds
    reasons = {
        BLURRY: [("sharpness", m.sharpness, "under", t.min_sharpness)],
        UNDEREXPOSED: [
            ("dark_fraction", m.dark_fraction, "over", t.max_dark_fraction),
            ("brightness", m.brightness, "under", t.min_brightness),
        ],
        OVEREXPOSED: [
            ("bright_fraction", m.bright_fraction, "over", t.max_bright_fraction),
            ("brightness", m.brightness, "over", t.max_brightness),
        ],
        LOW_RESOLUTION: [("resolution", m.resolution, "under", t.min_resolution)],
        UNIFORM: [("contrast", m.contrast, "under", t.min_contrast)],
    }
    parts = []
    for issue in quality.issues:
        found = [
            f"{name} {_text(value)}, {side} {_text(bound)}"
            for name, value, side, bound in reasons[issue]
            if bound is not None and (value < bound if side == "under" else value > bound)
        ]
        parts.append(f"{issue} ({'; '.join(found)})" if found else issue)
    return ", ".join(parts)


def _text(value: float) -> str:
    """3.14159 -> '3.14', 0.6 -> '0.6', 15.0 -> '15'."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def parse_policy(value: object, field: str) -> bool:
    """A request's quality policy, `flag` or `refuse` (any case; "" is `flag`): whether to
    refuse.

    Raises:
        InvalidArgument: naming `field`, for anything else.
    """
    if value is None or value == "":
        return False
    if isinstance(value, str) and value.lower() in POLICIES:
        return value.lower() == "refuse"
    raise InvalidArgument(f"{field} must be 'flag' or 'refuse'", field=field)


def parse_thresholds(
    values: Mapping[str, object], field_prefix: str = ""
) -> QualityThresholds | None:
    """A request's threshold overrides (`THRESHOLD_FIELDS` present in `values`; others are
    ignored; a None value, JSON's null, is absent, as proto3's JSON mapping reads null),
    checked: None when it sets none.

    Raises:
        InvalidArgument: naming `field_prefix` + the threshold, for a value that is not a
            finite number in the threshold's range.
    """
    given = {name: values[name] for name in THRESHOLD_FIELDS if values.get(name) is not None}
    if not given:
        return None
    for name, value in given.items():
        # An integer past 2**53 is no longer a float's exact value (and past ~1.8e308 none).
        finite = (isinstance(value, int) and abs(value) <= 2**53) or (
            isinstance(value, float) and math.isfinite(value)
        )
        if isinstance(value, bool) or not finite:
            raise InvalidArgument(
                f"{field_prefix}{name} must be a finite number", field=f"{field_prefix}{name}"
            )
    try:
        return QualityThresholds.model_validate(given)
    except ValidationError as error:
        problem = error.errors()[0]
        name = str(problem["loc"][0]) if problem["loc"] else ""
        message = str(problem["msg"]).removeprefix("Value error, ").lower()
        raise InvalidArgument(
            f"{field_prefix}{name}: {message}", field=f"{field_prefix}{name}"
        ) from None
