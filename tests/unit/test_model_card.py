"""The typed model card: every manifest written before it loads and dumps back to the same
JSON, unknown fields are kept, wrong types are refused by name, and the readers (report,
comparison, `GetModel`'s card) see the same figures as before."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from perito_core.models.card import Metrics, RocAuc, unknown_fields
from perito_core.models.manifest import ModelManifest, RunCard
from perito_training.compare import summarize_run

# Manifests as earlier versions wrote them, kept as files (tests/data/manifests):
DATA = Path(__file__).resolve().parent.parent / "data" / "manifests"
# what `perito publish` wrote for a trained run before the card was typed (three classes: a
# class-less split gives a null ROC AUC; no threshold reached the target: a null evidence);
TRAINED: dict[str, Any] = json.loads((DATA / "trained.json").read_text())
# what `perito models import` wrote for an ONNX file: no metrics, calibration or training.
IMPORTED: dict[str, Any] = json.loads((DATA / "imported.json").read_text())


def _trained_with(**metrics: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(TRAINED)
    manifest["metrics"] = metrics
    return manifest


def _round_trip(manifest: dict[str, Any]) -> dict[str, Any]:
    loaded = ModelManifest.model_validate_json(json.dumps(manifest))
    dumped: dict[str, Any] = json.loads(loaded.model_dump_json(indent=2))
    return dumped


@pytest.mark.parametrize(
    "manifest",
    [
        TRAINED,
        IMPORTED,
        # Published by hand (the SDK tests' fixtures): an accuracy alone.
        _trained_with(accuracy=0.9),
        # Fields in another order than the trainer's.
        _trained_with(images=300, accuracy=0.91, macro_avg={"precision": 1, "recall": 1, "f1": 1}),
    ],
    ids=["trained", "imported-onnx", "accuracy-only", "reordered"],
)
def test_a_manifest_written_before_the_types_dumps_back_to_the_same_json(
    manifest: dict[str, Any],
) -> None:
    assert _round_trip(manifest) == manifest
    # What a person reads (GetModel's card): the manifest but its identity, field for field.
    card = ModelManifest.model_validate(manifest).card().model_dump(mode="json")
    identity = {"schema_version", "name", "version"}
    assert card == {key: value for key, value in manifest.items() if key not in identity}


def test_the_trainers_field_order_is_kept() -> None:
    dumped = _round_trip(TRAINED)
    for part in ("metrics", "calibration", "training", "source"):
        assert list(dumped[part]) == list(TRAINED[part]), part
    assert list(dumped["metrics"]["roc_auc"]) == list(TRAINED["metrics"]["roc_auc"])


def test_the_parts_read_as_attributes() -> None:
    manifest = ModelManifest.model_validate(TRAINED)
    assert manifest.metrics.accuracy == pytest.approx(0.9722, abs=1e-4)
    assert manifest.metrics.per_class is not None
    assert manifest.metrics.per_class["severe"].support == 12
    assert manifest.metrics.roc_auc == RocAuc(
        ovr_macro=0.99, ovr_weighted=0.99, per_class=[0.98, 1.0, None]
    )
    assert manifest.calibration.confidence_threshold is None
    assert manifest.training.dataset is not None
    assert manifest.training.dataset.splits["val"]["images"] == 36
    assert manifest.training.architecture == "cnn4"
    assert manifest.source.published_by == "ds-team"
    imported = ModelManifest.model_validate(IMPORTED)
    assert imported.metrics.accuracy is None and imported.training.architecture is None
    assert imported.source.imported_from == "minerals.onnx"


def test_an_unset_field_is_left_out_and_a_null_one_kept() -> None:
    assert Metrics().model_dump(mode="json") == {}
    assert RocAuc(binary=None).model_dump(mode="json") == {"binary": None}
    assert Metrics(accuracy=1).model_dump_json() == '{"accuracy":1.0}'


def test_a_card_with_fields_this_code_does_not_know_still_loads_and_keeps_them() -> None:
    newer = copy.deepcopy(TRAINED)
    newer["metrics"]["top5_accuracy"] = 0.999
    newer["metrics"]["per_class"]["minor"]["specificity"] = 0.99
    newer["calibration"]["method_version"] = 2
    newer["training"]["gpu"] = {"name": "H200", "count": 1}
    newer["source"]["python"] = "3.13.1"

    manifest = ModelManifest.model_validate(newer)

    assert manifest.metrics.model_extra == {"top5_accuracy": 0.999}
    assert _round_trip(newer) == newer
    assert sorted(unknown_fields(manifest)) == [
        "calibration.method_version",
        "metrics.per_class.minor.specificity",
        "metrics.top5_accuracy",
        "source.python",
        "training.gpu",
    ]
    assert unknown_fields(ModelManifest.model_validate(TRAINED)) == []


@pytest.mark.parametrize(
    ("part", "field", "value", "where"),
    [
        ("metrics", "accuracy", "high", "metrics.accuracy"),
        ("metrics", "accuracy", 1.5, "metrics.accuracy"),
        ("calibration", "temperature", "warm", "calibration.temperature"),
        ("training", "epochs_run", "eight", "training.epochs_run"),
        ("source", "git_dirty", "maybe", "source.git_dirty"),
    ],
)
def test_a_wrong_type_is_refused_naming_the_field(
    part: str, field: str, value: object, where: str
) -> None:
    manifest = copy.deepcopy(TRAINED)
    manifest[part][field] = value
    with pytest.raises(ValidationError) as refused:
        ModelManifest.model_validate(manifest)
    assert where in str(refused.value)


def test_a_wrong_type_deep_in_the_card_is_refused_naming_its_path() -> None:
    manifest = copy.deepcopy(TRAINED)
    manifest["metrics"]["per_class"]["minor"]["support"] = "twelve"
    with pytest.raises(ValidationError, match=r"metrics\.per_class\.minor\.support"):
        ModelManifest.model_validate(manifest)


def _run_card() -> dict[str, Any]:
    """A run folder's card.json as the trainer writes it."""
    keys = (
        "name",
        "description",
        "labels",
        "input",
        "confidence_threshold",
        "metrics",
        "calibration",
        "training",
        "source",
    )
    card = {key: copy.deepcopy(TRAINED[key]) for key in keys}
    card["calibration"]["confidence_threshold"] = {
        "threshold": 0.98,
        "coverage": 0.75,
        "accuracy_above": 1.0,
        "target_accuracy": 0.99,
    }
    card["confidence_threshold"] = 0.98
    del card["source"]["published_by"]
    return card


def test_a_run_card_dumps_back_to_the_same_card_json() -> None:
    written = json.dumps(_run_card(), indent=2)
    card = RunCard.model_validate_json(written)
    assert json.dumps(card.model_dump(mode="json"), indent=2) == written


def test_the_comparison_reads_the_typed_card(tmp_path: Path) -> None:
    (tmp_path / "card.json").write_text(json.dumps(_run_card()))
    (tmp_path / "model.pt").write_bytes(b"\0" * 2_000_000)

    row = summarize_run(tmp_path)

    assert (row.architecture, row.input_size, row.epochs, row.train_seconds) == (
        "cnn4",
        32,
        8,
        69.5,
    )
    assert (row.test_images, row.accuracy, row.macro_f1) == (36, 0.9722222222222222, 0.9721)
    assert (row.roc_auc, row.ece, row.model_megabytes) == (0.99, 0.011783136261834038, 2.0)


def test_the_comparison_names_a_figure_the_card_lacks(tmp_path: Path) -> None:
    card = _run_card()
    del card["calibration"]["ece_test_after"]
    (tmp_path / "card.json").write_text(json.dumps(card))
    (tmp_path / "model.pt").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"calibration\.ece_test_after"):
        summarize_run(tmp_path)


def test_the_report_renders_the_typed_card() -> None:
    from perito_training.pipeline import render_report

    report = render_report(RunCard.model_validate(_run_card()))

    assert "- Architecture: `cnn4`, input 32x32 (squash)" in report
    assert "- Trained 8 epochs (best: 4) in 70 s; data fingerprint `98ffd43d39983b10`" in report
    assert "- Test accuracy **0.9722** on 36 images; macro F1 0.9721, weighted F1 0.9721" in report
    assert "- Calibration: temperature 0.050, test ECE 0.2336 -> 0.0118" in report
    assert "- Confidence threshold 0.980: validation predictions above it were 100.0% right" in (
        report
    )
    assert "- ROC AUC (one-vs-rest, macro) 0.9900" in report
    assert "| severe | 1.0000 | 0.9167 | 0.9565 | 12 |" in report
    # A card without figures (an imported model's) still renders, saying what it lacks.
    bare = RunCard.model_validate({key: _run_card()[key] for key in ("name", "labels", "input")})
    assert "- Test accuracy **n/a** on n/a images" in render_report(bare)


def test_the_trainer_writes_only_fields_the_card_declares() -> None:
    import numpy as np

    from perito_core.models.card import DatasetRecord, Source
    from perito_training.metrics import classification_report
    from perito_training.pipeline import _card_metrics, code_version

    targets = np.array([0, 1, 2, 2, 1, 0])
    probabilities = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.8 + 0.2 / 3
    for classes in (["a", "b", "c"], ["a", "b"]):
        rows = targets < len(classes)
        columns = probabilities[rows][:, : len(classes)]
        report = classification_report(targets[rows], columns, classes)
        metrics = _card_metrics(report, report)
        assert unknown_fields(metrics) == [], classes
        expected = {**report, "split": "test", "val_accuracy": report["accuracy"]}
        assert metrics.model_dump(mode="json") == expected
    assert unknown_fields(Source.model_validate(code_version())) == []
    summary = {
        "classes": ["a", "b"],
        "fingerprint_sha256": "0" * 64,
        "splits": {"train": {"images": 2, "a": 1, "b": 1}},
        "unreadable": [{"image": "a/1.jpg", "reason": "not an image"}],
    }
    assert unknown_fields(DatasetRecord.model_validate(summary)) == []
