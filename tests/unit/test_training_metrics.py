"""Metrics and calibration against scikit-learn, on fixed inputs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from perito_training.metrics import (
    classification_report,
    confidence_threshold,
    expected_calibration_error,
    fit_temperature,
    roc_curve,
    softmax,
)


@pytest.fixture
def three_classes() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    targets = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3))
    logits[np.arange(300), targets] += 1.2  # informative, but far from perfect
    return targets, softmax(logits)


def test_report_matches_scikit_learn_for_three_classes(
    three_classes: tuple[np.ndarray, np.ndarray],
) -> None:
    targets, probabilities = three_classes
    predicted = probabilities.argmax(1)
    report = classification_report(targets, probabilities, ["minor", "moderate", "severe"])

    assert report["accuracy"] == pytest.approx(sk.accuracy_score(targets, predicted))
    precision, recall, f1, support = sk.precision_recall_fscore_support(targets, predicted)
    for i, name in enumerate(["minor", "moderate", "severe"]):
        row = report["per_class"][name]
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]
    for average in ("macro", "weighted"):
        p, r, f, _ = sk.precision_recall_fscore_support(targets, predicted, average=average)
        assert report[f"{average}_avg"] == pytest.approx({"precision": p, "recall": r, "f1": f})
    assert report["confusion_matrix"]["matrix"] == sk.confusion_matrix(targets, predicted).tolist()
    auc = report["roc_auc"]
    assert auc["ovr_macro"] == pytest.approx(
        sk.roc_auc_score(targets, probabilities, multi_class="ovr", average="macro")
    )
    assert auc["ovr_weighted"] == pytest.approx(
        sk.roc_auc_score(targets, probabilities, multi_class="ovr", average="weighted")
    )


def test_binary_auc_and_curve_match_scikit_learn_with_ties() -> None:
    targets = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.4, 0.2, 0.65, 0.05])
    probabilities = np.stack([1 - scores, scores], axis=1)
    report = classification_report(targets, probabilities, ["negative", "positive"])
    assert report["roc_auc"]["binary"] == pytest.approx(sk.roc_auc_score(targets, scores))
    fpr, tpr = roc_curve(targets == 1, scores)
    expected_fpr, expected_tpr, _ = sk.roc_curve(targets, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(tpr, expected_tpr)


def test_a_class_never_predicted_scores_zero_like_scikit_learn() -> None:
    targets = np.array([0, 1, 2, 2])
    probabilities = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.0, 0.9], [0.2, 0.1, 0.7]])
    report = classification_report(targets, probabilities, ["a", "b", "c"])
    *_, f1, _ = sk.precision_recall_fscore_support(
        targets, probabilities.argmax(1), zero_division=0
    )
    assert report["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert [report["per_class"][c]["f1"] for c in "abc"] == pytest.approx(f1)


def test_expected_calibration_error_by_hand() -> None:
    # Two bins used: confidence 0.9 (2 images, 1 right) and 0.6 (2 images, both right).
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    targets = np.array([0, 1, 0, 1])
    assert expected_calibration_error(probabilities, targets) == pytest.approx(
        0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    )


def test_temperature_scaling_recovers_the_temperature_that_made_the_data() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (4000, 4))
    true_temperature = 2.5
    probabilities = softmax(logits / true_temperature)
    targets = np.array([rng.choice(4, p=row) for row in probabilities])
    fitted = fit_temperature(logits, targets)
    assert fitted == pytest.approx(true_temperature, rel=0.1)
    assert expected_calibration_error(softmax(logits / fitted), targets) < (
        expected_calibration_error(softmax(logits), targets) / 3
    )


def test_confidence_threshold_is_the_lowest_that_keeps_the_target_accuracy() -> None:
    # Sorted by confidence: right, right, right, wrong, right, wrong.
    top = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    probabilities = np.stack([top, 1 - top], axis=1)
    targets = np.array([0, 0, 0, 1, 0, 1])
    found = confidence_threshold(probabilities, targets, target_accuracy=0.8)
    assert found is not None
    # Above 0.7: 4 of 5 right (80%); adding 0.6 would make it 4 of 6.
    assert found["threshold"] == pytest.approx(0.7)
    assert found["coverage"] == pytest.approx(5 / 6)
    assert confidence_threshold(probabilities, targets, target_accuracy=1.0)["threshold"] == 0.9  # type: ignore[index]
    assert confidence_threshold(1 - probabilities, targets, target_accuracy=0.99) is None
