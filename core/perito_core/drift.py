"""Dataset-shift detection from a deployed classifier's own outputs: the card's reference, the
live windows, the two-sample tests and the verdict.

The method is Rabanser, Günnemann & Lipton, "Failing Loudly: An Empirical Study of Methods for
Detecting Dataset Shift" (NeurIPS 2019): black-box shift detection (BBSD) runs univariate
Kolmogorov-Smirnov tests on each dimension of the model's softmax output, comparing held-out
images of the training distribution with the live ones, and aggregates them with a Bonferroni
correction (the paper's best-performing detector on images). Beside it, each signal gets a
population stability index (PSI, binned), the figure risk teams read.

Signals (`SIGNALS`):

- `softmax`: the BBSD test over the reference's softmax dimensions (at most
  `MAX_DIMENSIONS`, the most often predicted classes): the smallest per-dimension KS p-value
  times the number of dimensions (Bonferroni), the statistic that dimension's, the PSI the
  largest of the dimensions'.
- `predicted_class`: the predicted-class frequencies (those classes, the rest pooled in one
  bin), a chi-square test of homogeneity (the reference's counts against the window's).
- `confidence`: the top-1 probability, a KS test.
- the photo-quality measures (`QUALITY_SIGNALS`, `perito_core.quality.QualityMeasures`),
  where the reference and the images have them: a KS test each.

The verdict (`evaluate`) is `drift` when any signal's p-value is under `ALPHA` divided by the
number of signals tested (Bonferroni again), `no_drift` otherwise, and `not_enough_images`
below `MIN_WINDOW` images in the window.

Storage is bounded: a reference keeps at most `MAX_REFERENCE_VALUES` values per distribution
(its quantiles, rounded to 4 significant digits) and at most `MAX_DIMENSIONS` softmax
dimensions; a live window is a capped Redis list per model version (`DriftWindows`) of compact
rows (`WindowRow`), shared by every server replica and worker that feeds it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from perito_core.models.card import DriftReference
from perito_core.quality import Quality, QualityMeasures

if TYPE_CHECKING:
    from pathlib import Path

    import redis

    from perito_core.imaging import InputSpec
    from perito_core.models.manifest import ModelManifest

log = logging.getLogger(__name__)

# Per distribution, the values a reference keeps (its quantiles beyond this many images).
MAX_REFERENCE_VALUES = 500
# Softmax dimensions a reference keeps: the most often predicted classes.
MAX_DIMENSIONS = 64
# Images a window needs before it gets a verdict.
MIN_WINDOW = 100
# The family-wise false-alarm rate of one verdict.
ALPHA = 0.05
# Bins of a continuous signal's PSI: the reference's deciles.
PSI_BINS = 10
# Floor of a bin's share in the PSI (an empty bin would make it infinite).
PSI_FLOOR = 1e-4
# The photo-quality measures that are signals, in this order in a window row.
QUALITY_SIGNALS: tuple[str, ...] = (
    "sharpness",
    "brightness",
    "contrast",
    "dark_fraction",
    "bright_fraction",
    "resolution",
)
SIGNALS: tuple[str, ...] = ("softmax", "predicted_class", "confidence", *QUALITY_SIGNALS)

DRIFT = "drift"
NO_DRIFT = "no_drift"
NOT_ENOUGH_IMAGES = "not_enough_images"
NO_REFERENCE = "no_reference"

# A sample of one signal's values.
Values = Sequence[float] | np.ndarray

# Redis: `perito:drift:{model}:{version}`, a list, newest row first.
KEY_PREFIX = "perito:drift"
# Redis: which versions have a window, a sorted set of `model:version` by the Unix time of the
# window's last write (so a replica finds the windows only workers or other replicas feed).
WINDOWS_INDEX_KEY = "perito:drift-windows"
# The job label of the offline comparison's bulk jobs (`perito models compare --images`): their
# images, a hand-picked folder, do not feed the live windows; other bulk jobs' images do.
COMPARE_JOB_LABEL = "perito-compare"
# A window is deleted this long after its last row was written (seconds: 30 days), so the
# windows of versions no longer used do not stay in the job store's Redis (no eviction).
WINDOW_TTL_S = 30 * 24 * 3600


def _round(value: float) -> float:
    """4 significant digits: what a reference and a window row keep of a value."""
    return float(f"{value:.4g}")


def _summary(values: np.ndarray) -> list[float]:
    """`values` (any length) as at most `MAX_REFERENCE_VALUES` rounded values: all of them,
    sorted, when they are that few, else their quantiles at (i + 0.5) / MAX_REFERENCE_VALUES
    (an empirical distribution function within 1 / MAX_REFERENCE_VALUES of theirs)."""
    values = np.sort(np.asarray(values, dtype=np.float64))
    if len(values) > MAX_REFERENCE_VALUES:
        levels = (np.arange(MAX_REFERENCE_VALUES) + 0.5) / MAX_REFERENCE_VALUES
        values = np.quantile(values, levels)
    return [_round(float(v)) for v in values]


def build_reference(
    probabilities: np.ndarray,
    labels: Sequence[str],
    quality: Sequence[QualityMeasures] = (),
    *,
    built_on: str,
) -> DriftReference:
    """The reference distributions of a model card, from held-out images of the training
    distribution (the trainer's test split, or `perito models import --calibration`'s folder).

    Args:
        probabilities: the served (calibrated) probabilities, float [N, C], N >= 1,
            C = len(labels).
        labels: the model's labels, in output order.
        quality: the photo-quality measures of images of the training distribution (any
            number; empty: no quality signals).
        built_on: which images, for the card (`test split, 1200 images`).

    Returns:
        The reference: at most `MAX_DIMENSIONS` softmax dimensions (the most often predicted
        classes, most frequent first, ties by label order), at most `MAX_REFERENCE_VALUES`
        values per distribution.

    Raises:
        ValueError: no images, non-finite probabilities, or a shape that is not [N, C].
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(labels):
        raise ValueError(f"probabilities must be [N, {len(labels)}], not {probabilities.shape}")
    if len(probabilities) == 0:
        raise ValueError("a drift reference needs at least one image")
    if not np.isfinite(probabilities).all():
        raise ValueError("a drift reference needs finite probabilities")
    predicted = probabilities.argmax(axis=1)
    counts = np.bincount(predicted, minlength=len(labels))
    order = sorted(range(len(labels)), key=lambda i: (-counts[i], i))
    dimensions = order[:MAX_DIMENSIONS]
    images = len(probabilities)
    measures: dict[str, list[float]] = {}
    if quality:
        measures = {
            name: _summary(np.array([getattr(m, name) for m in quality], dtype=np.float64))
            for name in QUALITY_SIGNALS
        }
    return DriftReference(
        images=images,
        built_on=built_on,
        classes=[labels[i] for i in dimensions],
        softmax=[_summary(probabilities[:, i]) for i in dimensions],
        predicted_class=[_round(counts[i] / images) for i in dimensions],
        predicted_other=_round(float(images - counts[dimensions].sum()) / images),
        confidence=_summary(probabilities.max(axis=1)),
        quality=measures,
        quality_images=len(quality),
    )


@dataclass(frozen=True)
class WindowRow:
    """One live image, as a window keeps it.

    Attributes:
        predicted: the top-1 class's position in the reference's `classes`, -1 for another.
        confidence: the top-1 probability, in [0, 1].
        softmax: the probabilities of the reference's `classes`, in that order.
        quality: the `QUALITY_SIGNALS` measures, or None (pixels sent: not measured).
    """

    predicted: int
    confidence: float
    softmax: tuple[float, ...]
    quality: tuple[float, ...] | None = None

    def encode(self) -> bytes:
        """Compact JSON: `[predicted, confidence, [softmax...], [quality...] | null]`."""
        return json.dumps(
            [self.predicted, self.confidence, list(self.softmax), self.quality],
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes | str) -> WindowRow:
        """The inverse of `encode`.

        Raises:
            ValueError: `data` is not a row.
        """
        try:
            predicted, confidence, softmax, quality = json.loads(data)
            return cls(
                int(predicted),
                float(confidence),
                tuple(float(v) for v in softmax),
                None if quality is None else tuple(float(v) for v in quality),
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"not a drift window row: {error}") from None


class RowEncoder:
    """Turns one version's answers into window rows (`encode`), its reference's class
    positions worked out once.

    Args:
        reference: the version's card reference (non-empty).
        labels: the version's labels, in output order.

    Raises:
        ValueError: the reference does not fit the labels (`DriftReference.check`).
    """

    def __init__(self, reference: DriftReference, labels: Sequence[str]) -> None:
        reference.check(labels)
        position = {label: i for i, label in enumerate(labels)}
        self.dimensions = np.array([position[c] for c in reference.classes], dtype=np.int64)
        self.slot = np.full(len(labels), -1, dtype=np.int64)
        self.slot[self.dimensions] = np.arange(len(self.dimensions))
        self.with_quality = bool(reference.quality)

    def encode(
        self, probabilities: np.ndarray, quality: Quality | QualityMeasures | None
    ) -> WindowRow | None:
        """One image's row: `probabilities` float [C] (the served ones); None when any is
        NaN or infinite (that answer was refused, MODEL_OUTPUT_NOT_FINITE)."""
        if not np.isfinite(probabilities).all():
            return None
        top = int(np.argmax(probabilities))
        measures = quality.measures if isinstance(quality, Quality) else quality
        return WindowRow(
            int(self.slot[top]),
            _round(float(probabilities[top])),
            tuple(_round(float(v)) for v in probabilities[self.dimensions]),
            None
            if measures is None or not self.with_quality
            else tuple(_round(float(getattr(measures, name))) for name in QUALITY_SIGNALS),
        )


def window_key(model: str, version: str) -> str:
    """The Redis list holding `model@version`'s live window."""
    return f"{KEY_PREFIX}:{model}:{version}"


class DriftWindows:
    """The live windows in Redis: rows queued in memory by `add` (no I/O: the request path),
    written in batches by `flush` (the server's drift monitor's thread, or a worker at the end
    of each chunk), each version's list capped at `window` rows and kept `WINDOW_TTL_S` after
    its last write (LPUSH, LTRIM, EXPIRE: one pipeline per flush for every version), and the
    version marked in `WINDOWS_INDEX_KEY` (`windowed_versions`), whose members go with their
    windows.

    Drift costs the callers nothing: neither `add` nor `flush` raises. A Redis failure drops
    the batch, logged and counted (`failed_rows`); an answer the drift code cannot turn into a
    row (a reference whose classes are not the version's labels, say) is dropped, logged and
    counted (`error_rows`). At most `max_pending` rows wait between flushes; more are dropped
    and counted (`shed_rows`).

    Args:
        client: the Redis connection (the job store's).
        window: rows kept per version (`PERITO_DRIFT_WINDOW`).
        max_pending: rows queued at most between two flushes.
    """

    def __init__(
        self,
        client: redis.Redis,
        window: int,
        *,
        max_pending: int = 10_000,
    ) -> None:
        self.client = client
        self.window = window
        self.max_pending = max_pending
        self.written_rows = 0
        self.failed_rows = 0
        self.shed_rows = 0
        self.error_rows = 0
        self._pending: dict[str, list[bytes]] = {}
        self._count = 0
        self._lock = threading.Lock()
        self._encoders: dict[tuple[str, str], RowEncoder | None] = {}
        self._last_error = 0.0

    def encoder(self, manifest: ModelManifest) -> RowEncoder | None:
        """`manifest`'s row encoder, made once per version; None without a reference."""
        key = (manifest.name, manifest.version)
        if key not in self._encoders:
            if len(self._encoders) >= 1024:
                self._encoders.clear()
            reference = manifest.drift
            self._encoders[key] = (
                RowEncoder(reference, manifest.labels) if reference.classes else None
            )
        return self._encoders[key]

    def add(
        self,
        manifest: ModelManifest,
        probabilities: Sequence[np.ndarray],
        quality: Sequence[Quality | QualityMeasures | None] = (),
    ) -> None:
        """Queue a window row for each answered image of `manifest`'s version (nothing for a
        version without a reference, nor for a non-finite answer). `quality`: each image's,
        in order, or empty when none was measured. Never raises: images it cannot make a row
        of are counted in `error_rows` and logged (at most once a minute)."""
        try:
            encoder = self.encoder(manifest)
            if encoder is None:
                return
            measured = list(quality) or [None] * len(probabilities)
            rows = [
                row.encode()
                for probs, judged in zip(probabilities, measured, strict=True)
                if (row := encoder.encode(probs, judged)) is not None
            ]
        except Exception as error:  # noqa: BLE001 - drift never fails the caller
            self.error_rows += len(probabilities)
            self._warn(
                "drift window rows of %s@%s not made (%d dropped): %s: %s",
                manifest.name,
                manifest.version,
                len(probabilities),
                type(error).__name__,
                error,
            )
            return
        if not rows:
            return
        key = window_key(manifest.name, manifest.version)
        with self._lock:
            room = self.max_pending - self._count
            if room < len(rows):
                self.shed_rows += len(rows) - max(room, 0)
                rows = rows[: max(room, 0)]
            self._pending.setdefault(key, []).extend(rows)
            self._count += len(rows)

    def flush(self) -> int:
        """Write the queued rows, one pipeline for every version; returns the rows written
        (0 when Redis failed: they are dropped, counted in `failed_rows`)."""
        with self._lock:
            pending, self._pending, self._count = self._pending, {}, 0
        if not pending:
            return 0
        rows = sum(len(batch) for batch in pending.values())
        now = time.time()
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key, batch in pending.items():
                    pipe.lpush(key, *batch[-self.window :])
                    pipe.ltrim(key, 0, self.window - 1)
                    pipe.expire(key, WINDOW_TTL_S)
                marked = {key[len(KEY_PREFIX) + 1 :]: now for key in pending}
                pipe.zadd(WINDOWS_INDEX_KEY, marked)
                pipe.zremrangebyscore(WINDOWS_INDEX_KEY, 0, now - WINDOW_TTL_S)
                pipe.expire(WINDOWS_INDEX_KEY, WINDOW_TTL_S)
                pipe.execute()
        except Exception as error:  # noqa: BLE001 - a lost batch only; counted and logged
            self.failed_rows += rows
            self._warn("drift window rows not written (%d dropped): %s", rows, error)
            return 0
        self.written_rows += rows
        return rows

    def _warn(self, message: str, *args: object) -> None:
        """Log a dropped batch, at most once a minute (the counters hold every one)."""
        now = time.monotonic()
        if now - self._last_error > 60:
            self._last_error = now
            log.warning(message, *args)

    def read(self, model: str, version: str) -> list[WindowRow]:
        """`model@version`'s window, newest first (rows that do not decode left out).

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        return read_window(self.client, model, version, self.window)


def windowed_versions(client: redis.Redis, limit: int) -> list[tuple[str, str]]:
    """The (model, version) of the `limit` most recently written live windows, newest first,
    whoever wrote them (a server replica, a bulk worker).

    Raises:
        redis.RedisError: Redis is unreachable.
    """
    versions = []
    for member in client.zrevrange(WINDOWS_INDEX_KEY, 0, limit - 1):
        text = member.decode() if isinstance(member, bytes) else str(member)
        model, _, version = text.rpartition(":")
        if model and version:
            versions.append((model, version))
    return versions


def read_window(client: redis.Redis, model: str, version: str, window: int) -> list[WindowRow]:
    """The newest `window` rows of `model@version`'s live window, newest first; rows that do
    not decode are left out.

    Raises:
        redis.RedisError: Redis is unreachable.
    """
    rows = []
    for data in client.lrange(window_key(model, version), 0, window - 1):
        try:
            rows.append(WindowRow.decode(data))
        except ValueError:
            continue
    return rows


@dataclass(frozen=True)
class SignalResult:
    """One signal's comparison of the window with the reference.

    Attributes:
        signal: its name (`SIGNALS`).
        statistic: the KS statistic D in [0, 1] (`softmax`: the dimension with the smallest
            p-value), or the chi-square statistic (`predicted_class`).
        p_value: the test's p-value in [0, 1] (`softmax`: Bonferroni-corrected over its
            dimensions).
        psi: the population stability index, >= 0 (`softmax`: the largest over dimensions).
        images: the window's images that carry the signal.
    """

    signal: str
    statistic: float
    p_value: float
    psi: float
    images: int


@dataclass(frozen=True)
class DriftReport:
    """A verdict on one model version's live window (`evaluate`).

    Attributes:
        verdict: `drift`, `no_drift`, `not_enough_images` or `no_reference`.
        window: images in the window.
        min_window: images a verdict needs.
        alpha: the family-wise false-alarm rate.
        signals: each tested signal's result (empty without a verdict).
        p_value: the smallest signal p-value times the number of signals (Bonferroni, at
            most 1); None without a verdict.
    """

    verdict: str
    window: int
    min_window: int
    alpha: float
    signals: tuple[SignalResult, ...] = ()
    p_value: float | None = None

    @property
    def detected(self) -> bool:
        return self.verdict == DRIFT

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: what `perito models drift --json` prints."""
        return {
            "verdict": self.verdict,
            "window_images": self.window,
            "min_window": self.min_window,
            "alpha": self.alpha,
            "p_value": self.p_value,
            "signals": [
                {
                    "signal": s.signal,
                    "statistic": s.statistic,
                    "p_value": s.p_value,
                    "psi": s.psi,
                    "images": s.images,
                }
                for s in self.signals
            ],
        }


def population_stability_index(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSI of two binned distributions (shares or counts, same bins):
    sum((a - e) * ln(a / e)) over bins, each share floored at `PSI_FLOOR`. Conventionally under
    0.1 is stable, 0.1 to 0.25 a moderate shift, over 0.25 a major one."""
    e = np.maximum(np.asarray(expected, np.float64) / max(float(np.sum(expected)), 1e-12), 0)
    a = np.maximum(np.asarray(actual, np.float64) / max(float(np.sum(actual)), 1e-12), 0)
    e, a = np.maximum(e, PSI_FLOOR), np.maximum(a, PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def binned_psi(
    reference: Sequence[float] | np.ndarray, live: Sequence[float] | np.ndarray
) -> float:
    """PSI of a continuous signal over the reference's decile bins (`PSI_BINS`; tied deciles
    merge: a signal the reference holds at one value has fewer bins)."""
    ref = np.asarray(reference, np.float64)
    edges = np.unique(np.quantile(ref, np.arange(1, PSI_BINS) / PSI_BINS))
    bins = len(edges) + 1
    expected = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=bins)
    actual = np.bincount(
        np.searchsorted(edges, np.asarray(live, np.float64), side="right"), minlength=bins
    )
    return population_stability_index(expected, actual)


def ks_test(reference: Values, live: Values) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test (`scipy.stats.ks_2samp`, two-sided): (D, p)."""
    from scipy.stats import ks_2samp

    result = ks_2samp(np.asarray(reference, np.float64), np.asarray(live, np.float64))
    return float(result.statistic), float(result.pvalue)


def _softmax_signal(reference: DriftReference, rows: Sequence[WindowRow]) -> SignalResult:
    """BBSD: a KS test per softmax dimension, Bonferroni-corrected (Rabanser et al. 2019)."""
    live = np.array([row.softmax for row in rows], dtype=np.float64)
    tests = [ks_test(values, live[:, d]) for d, values in enumerate(reference.softmax)]
    worst = min(range(len(tests)), key=lambda d: tests[d][1])
    psi = max(binned_psi(values, live[:, d]) for d, values in enumerate(reference.softmax))
    p_value = min(1.0, tests[worst][1] * len(tests))
    return SignalResult("softmax", tests[worst][0], p_value, psi, len(rows))


def _class_signal(reference: DriftReference, rows: Sequence[WindowRow]) -> SignalResult:
    """Predicted-class frequencies: chi-square test of homogeneity of the reference's counts
    (its shares times its images) and the window's, over the bins either holds."""
    from scipy.stats import chi2_contingency

    bins = len(reference.classes) + 1  # the last pools every other class
    shares = np.array([*reference.predicted_class, reference.predicted_other], np.float64)
    expected = np.rint(shares * (reference.images or 0))
    counts = Counter(row.predicted for row in rows)
    actual = np.array([counts.get(i, 0) for i in range(bins - 1)] + [counts.get(-1, 0)])
    table = np.array([expected, actual], dtype=np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:  # one class on both sides: nothing can differ
        statistic, p_value = 0.0, 1.0
    else:
        result = chi2_contingency(table, correction=False)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    psi = population_stability_index(shares, actual)
    return SignalResult("predicted_class", statistic, p_value, psi, len(rows))


def _continuous(name: str, reference: Sequence[float], live: Sequence[float]) -> SignalResult:
    statistic, p_value = ks_test(reference, live)
    return SignalResult(name, statistic, p_value, binned_psi(reference, live), len(live))


def evaluate(
    reference: DriftReference,
    rows: Sequence[WindowRow],
    *,
    min_window: int = MIN_WINDOW,
    alpha: float = ALPHA,
) -> DriftReport:
    """Compare a live window with the card's reference: the verdict and each signal.

    Args:
        reference: the version's card reference (`ModelManifest.drift`).
        rows: the window (`read_window`), encoded against that reference.
        min_window: images needed for a verdict (at least 1).
        alpha: the family-wise false-alarm rate, in (0, 1).

    Returns:
        `no_reference` when `reference` is empty; `not_enough_images` under `min_window`
        rows; else `drift` when a signal's p-value is under alpha / (signals tested), with
        every signal's statistic, p-value and PSI.
    """
    if not reference.classes:
        return DriftReport(NO_REFERENCE, len(rows), min_window, alpha)
    width = len(reference.classes)
    rows = [row for row in rows if len(row.softmax) == width]
    if len(rows) < min_window:
        return DriftReport(NOT_ENOUGH_IMAGES, len(rows), min_window, alpha)
    signals = [
        _softmax_signal(reference, rows),
        _class_signal(reference, rows),
        _continuous("confidence", reference.confidence, [row.confidence for row in rows]),
    ]
    measured = [row.quality for row in rows if row.quality is not None]
    if reference.quality and len(measured) >= min_window:
        for i, name in enumerate(QUALITY_SIGNALS):
            if values := reference.quality.get(name):
                signals.append(_continuous(name, values, [q[i] for q in measured]))
    p_value = min(1.0, min(s.p_value for s in signals) * len(signals))
    verdict = DRIFT if p_value < alpha else NO_DRIFT
    return DriftReport(verdict, len(rows), min_window, alpha, tuple(signals), p_value)


# Fewest readable images a folder needs to make a reference (`reference_from_folder`).
MIN_REFERENCE_IMAGES = 50


def reference_from_folder(
    predict: Callable[[np.ndarray], np.ndarray],
    labels: Sequence[str],
    spec: InputSpec,
    folder: Path,
    *,
    limit: int = 5000,
    batch_size: int = 32,
) -> tuple[DriftReference | None, str]:
    """A reference from a folder of images of the model's own distribution, none of them
    trained on (`perito models import --calibration`): each image decoded, measured and
    prepared by the serving code, run through `predict`.

    Args:
        predict: the model: uint8 [N, H, W, 3] in, served probabilities float [N, C] out.
        labels: the model's labels (C).
        spec: the model's input.
        folder: read recursively, in name order, at most `limit` images (unreadable files and
            hidden or system files left out).
        batch_size: images per `predict` call.

    Returns:
        The reference and a line saying what it was built on; or None and why not (fewer than
        `MIN_REFERENCE_IMAGES` readable images, or non-finite outputs).
    """
    from perito_core.errors import InvalidImage
    from perito_core.imaging import load_model_input_with_info
    from perito_core.jobs.sources import is_ignored_key

    images: list[np.ndarray] = []
    measured: list[QualityMeasures] = []
    for path in sorted(folder.rglob("*")):
        if len(images) >= limit:
            break
        if not path.is_file() or is_ignored_key(path.relative_to(folder).as_posix()):
            continue
        try:
            pixels, info = load_model_input_with_info(path.read_bytes(), spec)
        except InvalidImage:
            continue
        images.append(pixels)
        if info.quality is not None:
            measured.append(info.quality)
    if len(images) < MIN_REFERENCE_IMAGES:
        return None, (
            f"{folder} holds {len(images)} readable images; a drift reference needs at least "
            f"{MIN_REFERENCE_IMAGES}"
        )
    stacked = np.stack(images)
    probabilities = np.concatenate(
        [predict(stacked[i : i + batch_size]) for i in range(0, len(stacked), batch_size)]
    )
    built_on = f"{len(images)} images of {folder.name}"
    try:
        return build_reference(probabilities, labels, measured, built_on=built_on), built_on
    except ValueError as error:
        return None, str(error)
