"""Drift detection's statistics (perito_core.drift): the reference a card keeps, the window
rows, the tests and the verdict, on known unshifted and shifted samples."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from perito_core.drift import (
    DRIFT,
    MAX_DIMENSIONS,
    MAX_REFERENCE_VALUES,
    NO_DRIFT,
    NO_REFERENCE,
    NOT_ENOUGH_IMAGES,
    QUALITY_SIGNALS,
    DriftWindows,
    RowEncoder,
    WindowRow,
    binned_psi,
    build_reference,
    evaluate,
    population_stability_index,
)
from perito_core.errors import InvalidArgument
from perito_core.models.card import DriftReference
from perito_core.models.registry import ModelRegistry
from perito_core.quality import Quality, QualityMeasures
from perito_server.drift import DriftMonitor
from tests.conftest import publish_tiny
from tests.helpers import unpublished_manifest

LABELS = ["minor", "moderate", "severe"]


def softmax_sample(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Probabilities [n, 3] of logits N(0, 1) per class, class 0's logits moved by `shift`."""
    logits = rng.normal(0.0, 1.0, (n, 3))
    logits[:, 0] += shift
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def measures(rng: np.random.Generator, n: int, brightness: float = 120.0) -> list[QualityMeasures]:
    return [
        QualityMeasures(
            sharpness=float(rng.lognormal(5, 0.5)),
            dark_fraction=float(rng.uniform(0, 0.1)),
            bright_fraction=float(rng.uniform(0, 0.1)),
            brightness=float(rng.normal(brightness, 15)),
            contrast=float(rng.normal(50, 8)),
            width=640,
            height=480,
            resolution=480 / 224,
        )
        for _ in range(n)
    ]


def rows_of(reference: DriftReference, probs: np.ndarray, quality: list[QualityMeasures]) -> list:
    encoder = RowEncoder(reference, LABELS)
    rows = [encoder.encode(p, q) for p, q in zip(probs, quality, strict=True)]
    return [WindowRow.decode(row.encode()) for row in rows if row is not None]


@pytest.fixture
def reference() -> DriftReference:
    rng = np.random.default_rng(0)
    return build_reference(
        softmax_sample(rng, 2000), LABELS, measures(rng, 1500), built_on="test split, 2000 images"
    )


def test_reference_is_bounded_and_round_trips_through_the_card(reference: DriftReference) -> None:
    assert reference.images == 2000
    assert len(reference.classes) == 3
    assert all(len(values) == MAX_REFERENCE_VALUES for values in reference.softmax)
    assert len(reference.confidence) == MAX_REFERENCE_VALUES
    assert set(reference.quality) == set(QUALITY_SIGNALS)
    assert sum(reference.predicted_class) + (reference.predicted_other or 0) == pytest.approx(
        1, 1e-3
    )
    # Rounded to 4 significant digits, sorted.
    assert all(float(f"{v:.4g}") == v for v in reference.confidence)
    assert reference.confidence == sorted(reference.confidence)
    card = unpublished_manifest(LABELS, drift=reference)
    again = type(card).model_validate_json(card.model_dump_json())
    assert again.drift == reference


def test_many_classes_keep_the_most_predicted_dimensions() -> None:
    rng = np.random.default_rng(1)
    labels = [f"c{i}" for i in range(100)]
    logits = rng.normal(0, 1, (3000, 100))
    logits[:, 7] += 3  # the class predicted most
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    reference = build_reference(probs, labels, built_on="x")
    assert len(reference.classes) == MAX_DIMENSIONS
    assert reference.classes[0] == "c7"
    assert len(json.dumps(reference.model_dump(mode="json"))) < 400_000
    row = RowEncoder(reference, labels).encode(probs[0], None)
    assert row is not None and len(row.softmax) == MAX_DIMENSIONS and row.quality is None


def test_a_card_without_a_reference_dumps_as_before() -> None:
    card = unpublished_manifest(LABELS)
    assert "drift" not in card.model_dump(mode="json")
    assert "drift" not in card.card().model_dump(mode="json")


def test_unshifted_samples_stay_quiet(reference: DriftReference) -> None:
    quiet = 0
    for seed in range(10, 30):
        rng = np.random.default_rng(seed)
        rows = rows_of(reference, softmax_sample(rng, 500), measures(rng, 500))
        report = evaluate(reference, rows)
        assert report.window == 500
        quiet += report.verdict == NO_DRIFT
        assert all(s.psi < 0.1 for s in report.signals), report.signals
    # The family-wise false-alarm rate is at most 5%: 20 tries, at most 2 alarms.
    assert quiet >= 18


def test_a_shifted_softmax_is_detected(reference: DriftReference) -> None:
    rng = np.random.default_rng(2)
    rows = rows_of(reference, softmax_sample(rng, 300, shift=1.0), measures(rng, 300))
    report = evaluate(reference, rows)
    assert report.verdict == DRIFT
    by_signal = {s.signal: s for s in report.signals}
    assert by_signal["softmax"].p_value < 0.001
    assert by_signal["predicted_class"].p_value < 0.001
    assert by_signal["brightness"].p_value > 0.01  # the photos themselves did not change


def test_darker_photos_are_detected_by_their_brightness(reference: DriftReference) -> None:
    rng = np.random.default_rng(3)
    rows = rows_of(reference, softmax_sample(rng, 200), measures(rng, 200, brightness=90))
    report = evaluate(reference, rows)
    assert report.verdict == DRIFT
    brightness = next(s for s in report.signals if s.signal == "brightness")
    assert brightness.p_value < 1e-6 and brightness.psi > 0.25


def test_too_few_images_get_no_verdict(reference: DriftReference) -> None:
    rng = np.random.default_rng(4)
    rows = rows_of(reference, softmax_sample(rng, 99, shift=3.0), measures(rng, 99))
    report = evaluate(reference, rows)
    assert report.verdict == NOT_ENOUGH_IMAGES and report.signals == () and report.window == 99
    assert evaluate(DriftReference(), rows).verdict == NO_REFERENCE


def test_psi() -> None:
    assert population_stability_index(np.array([50, 50]), np.array([50, 50])) == 0
    # (0.8 - 0.5) ln(0.8 / 0.5) + (0.2 - 0.5) ln(0.2 / 0.5)
    assert population_stability_index(np.array([1, 1]), np.array([8, 2])) == pytest.approx(
        0.3 * np.log(1.6) - 0.3 * np.log(0.4)
    )
    rng = np.random.default_rng(5)
    same = binned_psi(rng.normal(0, 1, 500), rng.normal(0, 1, 2000))
    moved = binned_psi(rng.normal(0, 1, 500), rng.normal(1, 1, 2000))
    assert same < 0.05 < 0.25 < moved


def test_non_finite_answers_make_no_row(reference: DriftReference) -> None:
    encoder = RowEncoder(reference, LABELS)
    assert encoder.encode(np.array([np.nan, 0.5, 0.5]), None) is None
    quality = Quality(measures(np.random.default_rng(6), 1)[0])
    row = encoder.encode(np.array([0.2, 0.7, 0.1], np.float32), quality)
    assert row is not None and row.quality is not None and len(row.quality) == 6
    assert reference.classes[row.predicted] == "moderate" and row.confidence == pytest.approx(0.7)


class FailingRedis:
    def pipeline(self, transaction: bool = False) -> object:
        raise ConnectionError("redis is down")


def test_a_redis_failure_drops_the_batch_and_counts_it(reference: DriftReference) -> None:
    manifest = unpublished_manifest(LABELS, drift=reference)
    windows = DriftWindows(FailingRedis(), 100, max_pending=5)  # type: ignore[arg-type]
    windows.add(manifest, list(softmax_sample(np.random.default_rng(7), 8)))
    assert windows.shed_rows == 3
    assert windows.flush() == 0
    assert windows.failed_rows == 5
    # A version without a reference queues nothing.
    bare = unpublished_manifest(LABELS).model_copy(update={"version": "2"})
    windows.add(bare, list(softmax_sample(np.random.default_rng(8), 4)))
    assert windows.flush() == 0 and windows.failed_rows == 5


def misfit(reference: DriftReference) -> DriftReference:
    """`reference` with its first class renamed to one that is not a label."""
    return reference.model_copy(update={"classes": ["scratch", *reference.classes[1:]]})


def test_a_reference_that_does_not_fit_the_labels_is_refused_at_publish(
    reference: DriftReference, tmp_path: Path, tiny_model_file: Path
) -> None:
    registry = ModelRegistry.open(str(tmp_path / "registry"), cache_dir=tmp_path / "cache")
    with pytest.raises(InvalidArgument, match=r"classes \['scratch'\] are not among"):
        publish_tiny(registry, tiny_model_file, drift=misfit(reference))
    short = reference.model_copy(update={"softmax": reference.softmax[:2]})
    with pytest.raises(InvalidArgument, match="2 softmax entries for 3 classes"):
        publish_tiny(registry, tiny_model_file, drift=short)
    assert registry.list_versions("tiny") == []
    assert publish_tiny(registry, tiny_model_file, drift=reference) == "1"


class RecordingRedis:
    """A client whose pipelines record their commands."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def pipeline(self, transaction: bool = False) -> RecordingRedis:
        return self

    def __enter__(self) -> RecordingRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.commands.append((name, args))


def test_an_answer_drift_cannot_use_is_dropped_and_counted_never_raised(
    reference: DriftReference,
) -> None:
    # A reference published before publishing checked it, or an output of the wrong width.
    bad = unpublished_manifest(LABELS, drift=misfit(reference))
    windows = DriftWindows(RecordingRedis(), 100)  # type: ignore[arg-type]
    windows.add(bad, list(softmax_sample(np.random.default_rng(9), 4)))
    assert windows.error_rows == 4
    good = unpublished_manifest(LABELS, drift=reference)
    windows.add(good, [np.array([0.5, 0.5])])  # two outputs for three labels
    assert windows.error_rows == 5
    assert windows.flush() == 0


def test_each_write_renews_the_windows_expiry(reference: DriftReference) -> None:
    client = RecordingRedis()
    windows = DriftWindows(client, 100)  # type: ignore[arg-type]
    windows.add(unpublished_manifest(LABELS, drift=reference), [np.array([0.2, 0.7, 0.1])])
    assert windows.flush() == 1
    names = [name for name, _ in client.commands]
    assert names == ["lpush", "ltrim", "expire", "zadd", "zremrangebyscore", "expire", "execute"]
    assert client.commands[2][1] == ("perito:drift:m:1", 30 * 24 * 3600)
    # The version is marked as having a window, for every replica's gauges.
    index, marked = client.commands[3][1]
    assert index == "perito:drift-windows" and list(marked) == ["m:1"]
    assert client.commands[5][1] == ("perito:drift-windows", 30 * 24 * 3600)


class FakePool:
    registry = None

    def served(self) -> list[object]:
        return []


def test_the_monitor_never_fails_a_caller_and_outlives_a_failed_round(
    reference: DriftReference,
) -> None:
    monitor = DriftMonitor(
        RecordingRedis(),  # type: ignore[arg-type]
        FakePool(),  # type: ignore[arg-type]
        window=100,
        interval_s=0.05,
        flush_s=0.01,
    )
    monitor.observe(
        unpublished_manifest(LABELS, drift=misfit(reference)), [np.array([0.2, 0.7, 0.1])], []
    )
    dropped = {
        sample.labels["reason"]: sample.value
        for family in monitor.collect()
        if family.name == "perito_drift_rows_dropped"
        for sample in family.samples
    }
    assert dropped["error"] == 1
    rounds = 0
    again = threading.Event()

    def flush() -> int:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            raise RuntimeError("a bug in a round")
        again.set()
        return 0

    monitor.windows.flush = flush  # type: ignore[method-assign]
    monitor.start()
    try:
        assert again.wait(5), "the monitor's thread died with its first round"
        assert monitor.evaluation_failures >= 1
    finally:
        monitor.windows.flush = lambda: 0  # type: ignore[method-assign]
        monitor.close()


def test_api_cards_carry_a_summary_of_the_reference(reference: DriftReference) -> None:
    manifest = unpublished_manifest(LABELS, drift=reference)
    card = manifest.card().model_dump(mode="json")
    assert card["drift"] == {
        "images": 2000,
        "built_on": "test split, 2000 images",
        "classes": reference.classes,
        "quality_images": 1500,
        "signals": ["softmax", "predicted_class", "confidence", *QUALITY_SIGNALS],
    }
    assert len(json.dumps(card["drift"])) < 1000
    # manifest.json keeps the whole reference.
    assert manifest.model_dump(mode="json")["drift"]["softmax"] == reference.softmax
