"""The card's figures an answer carries, the reliability curve they are read from, the digests
a job records once, and the SDK's typed fields for all of it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from perito._models import Classification, Explanation
from perito.v1 import classify_pb2
from perito_core.models.calibration import expected_calibration_error, reliability_curve
from perito_core.models.card import Calibration, Metrics
from perito_core.models.manifest import Artifact, ModelManifest
from perito_core.models.provenance import (
    MIN_BIN_IMAGES,
    CardFigures,
    ServedVersion,
    provenance_record,
    sha256_hex,
)
from perito_core.models.summary import summarize
from perito_server.answers import classification_message
from tests.helpers import TINY_INPUT


def manifest(**card: object) -> ModelManifest:
    return ModelManifest(
        name="car-damage",
        version="3",
        labels=["minor", "severe"],
        input=TINY_INPUT,
        artifact=Artifact(sha256="a" * 64, size_bytes=10),
        **card,  # type: ignore[arg-type]
    )


def test_the_reliability_curve_is_the_ece_s_bins() -> None:
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(4), size=500)
    targets = rng.integers(0, 4, size=500)
    curve = reliability_curve(probabilities, targets)
    assert [b["lower"] for b in curve] == pytest.approx(list(np.linspace(0, 1, 16)[:-1]), abs=1e-6)
    assert sum(b["count"] for b in curve) == 500
    ece = sum(b["count"] / 500 * abs(b["accuracy"] - b["confidence"]) for b in curve if b["count"])
    assert ece == pytest.approx(expected_calibration_error(probabilities, targets))
    top = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == targets
    inside = (top > 0.4) & (top <= 0.4 + 1 / 15)
    [bin_] = [b for b in curve if b["lower"] == pytest.approx(0.4)]
    assert bin_["count"] == int(inside.sum())
    assert bin_["accuracy"] == pytest.approx(right[inside].mean())
    # The card takes it as it is.
    assert Calibration(reliability=curve).reliability is not None


def test_expected_accuracy_is_the_bin_s_and_absent_where_the_bin_is_thin_or_missing() -> None:
    bins = [
        {"lower": 0.5, "upper": 0.75, "count": 400, "accuracy": 0.7},
        {"lower": 0.75, "upper": 1.0, "count": MIN_BIN_IMAGES - 1, "accuracy": 1.0},
    ]
    figures = CardFigures.of(manifest(calibration={"reliability": bins}))
    assert figures.expected_accuracy(0.6) == 0.7
    assert figures.expected_accuracy(0.75) == 0.7  # a bin holds its upper edge
    assert figures.expected_accuracy(0.9) is None  # 19 images: too few to say
    assert figures.expected_accuracy(0.3) is None  # under every bin
    assert CardFigures.of(manifest()).expected_accuracy(0.9) is None  # no curve


def test_the_answer_carries_the_card_s_figures_and_leaves_them_out_without_a_card() -> None:
    scores = {
        "minor": {"precision": 0.8, "recall": 0.9, "f1": 0.85, "support": 10},
        "severe": {"precision": 0.6, "recall": 0.5, "f1": 0.55, "support": 10},
    }
    bins = [{"lower": 0.5, "upper": 1.0, "count": 100, "accuracy": 0.93}]
    carded = manifest(metrics=Metrics(per_class=scores), calibration={"reliability": bins})
    summary = summarize(np.array([0.2, 0.8], np.float32), carded.labels, 2, None)
    kwargs = {"image_id": "a", "form": "torchscript-fp32", "first_frame_only": False}
    message = classification_message(summary, **kwargs, figures=CardFigures.of(carded))
    result = Classification._from_proto(message)
    assert result.expected_accuracy == pytest.approx(0.93)
    assert [(p.label, p.card_precision, p.card_recall) for p in result.predictions] == [
        ("severe", pytest.approx(0.6), pytest.approx(0.5)),
        ("minor", pytest.approx(0.8), pytest.approx(0.9)),
    ]
    bare = classification_message(summary, **kwargs)
    assert bare == classification_message(summary, **kwargs, figures=CardFigures.of(manifest()))
    assert not bare.HasField("expected_accuracy") and not bare.HasField("provenance")
    plain = Classification._from_proto(bare)
    assert plain.expected_accuracy is None and plain.provenance is None
    assert plain.predictions[0].card_precision is None


def test_a_job_records_the_digests_once_and_each_form_finds_its_files() -> None:
    served = ServedVersion(
        "model.pt",
        "b" * 64,
        {
            "openvino-int8": {
                "forms/openvino-int8/model.xml": "c" * 64,
                "forms/openvino-int8/model.bin": "d" * 64,
            }
        },
        0.6,
    )
    assert ServedVersion.from_json(served.to_json()) == served
    assert ServedVersion.from_json("") is None
    assert served.form_files("torchscript-fp32") == {"model.pt": "b" * 64}
    record = provenance_record(
        served,
        input_sha256=sha256_hex(b"photo"),
        model="car-damage",
        model_version="3",
        form="openvino-int8",
        confidence_threshold=0.6,
        request_id="job-1",
    )
    assert record["input_sha256"] == hashlib.sha256(b"photo").hexdigest()
    assert [f["file"] for f in record["form_files"]] == [
        "forms/openvino-int8/model.xml",
        "forms/openvino-int8/model.bin",
    ]
    provenance = Classification._from_proto(
        classify_pb2.Classification(
            image_id="a",
            predictions=[classify_pb2.Prediction(label="minor", probability=1.0)],
            provenance=classify_pb2.Provenance(**record),
        )
    ).provenance
    assert provenance is not None
    assert provenance.form_files["forms/openvino-int8/model.bin"] == "d" * 64
    assert provenance.artifact_sha256 == "b" * 64 and provenance.request_id == "job-1"


def test_an_explanation_saves_its_overlay_and_reads_its_grid_as_rows(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"overlay"
    message = classify_pb2.Explanation(
        method="occlusion",
        class_index=1,
        label="severe",
        grid_height=2,
        grid_width=3,
        grid=[0, 0.5, 1, 0.25, 0, 0],
        overlay_png=png,
    )
    explanation = Explanation._from_proto(message)
    assert explanation.grid == [[0, 0.5, 1], [0.25, 0, 0]]
    assert (explanation.grid_height, explanation.grid_width) == (2, 3)
    assert explanation.save(tmp_path / "x.png").read_bytes() == png
