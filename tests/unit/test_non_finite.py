"""An output that is not probabilities is never an answer: NaN and infinity, values outside
[0, 1], rows not summing to 1. The summary refuses them, the OIP `classification` parameter
refuses NaN and infinity, and the results file refuses to write them."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from perito.v1.vocabulary import ItemState, JobState
from perito_core.errors import InvalidArgument
from perito_core.jobs.results import write_results
from perito_core.jobs.store import ItemResult, Job
from perito_core.models.summary import (
    MODEL_OUTPUT_NOT_FINITE,
    MODEL_OUTPUT_NOT_PROBABILITIES,
    output_faults,
    summarize,
)
from perito_server.oip_protocol import classification_count

LABELS = ["a", "b", "c"]
BAD = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", BAD)
def test_output_faults_names_each_image_whose_output_holds_nan_or_infinity(bad: float) -> None:
    rows = np.array([[0.2, 0.3, 0.5], [0.1, bad, 0.9], [1.0, 0.0, 0.0], [bad] * 3], np.float32)
    assert output_faults(rows) == {1: MODEL_OUTPUT_NOT_FINITE, 3: MODEL_OUTPUT_NOT_FINITE}
    assert output_faults(list(rows[[0, 2]])) == {}
    with pytest.raises(ValueError, match=MODEL_OUTPUT_NOT_FINITE):
        summarize(rows[1], LABELS, 3, 0.5)


@pytest.mark.parametrize(
    "row",
    [
        [1.5, -0.5, 0.0],  # sums to 1, outside [0, 1]
        [1.6667, 1.6667, -0.3333],
        [0.5, 0.5, 0.5],  # within [0, 1], sums to 1.5
        [0.2, 0.2, 0.2],
        [0.9, 0.1, -0.002],
    ],
)
def test_an_output_that_is_not_probabilities_is_no_answer(row: list[float]) -> None:
    rows = np.array([[0.2, 0.3, 0.5], row], np.float32)
    assert output_faults(rows) == {1: MODEL_OUTPUT_NOT_PROBABILITIES}
    with pytest.raises(ValueError, match=MODEL_OUTPUT_NOT_PROBABILITIES):
        summarize(rows[1], LABELS, 3, 0.5)


def test_float32_softmax_of_a_thousand_classes_is_probabilities() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 8, (64, 1000)).astype(np.float32)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    assert output_faults((exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)) == {}
    assert output_faults(np.array([[1.0005, 0.0, -0.0004]], np.float32)) == {}


def test_summarize_answers_finite_probabilities() -> None:
    summary = summarize(np.array([0.1, 0.7, 0.2], np.float32), LABELS, 2, 0.8)
    assert [p.label for p in summary.predictions] == ["b", "c"]
    assert summary.uncertain and math.isfinite(summary.normalized_entropy)


@pytest.mark.parametrize("bad", [*BAD, 2.5, "3", True])
def test_the_classification_parameter_refuses_what_is_not_a_whole_number(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="classification parameter"):
        classification_count(bad)
    assert classification_count(4.0) == 4


class _Store:
    """The one method of `JobStore` that `write_results` reads."""

    def __init__(self, results: list[ItemResult]) -> None:
        self._results = results

    def results(self, job_id: str, start: int, count: int) -> list[ItemResult]:
        return self._results[start : start + count]


def _job() -> Job:
    return Job(id="j", state=JobState.RUNNING, model="m", model_version="1", total=1)


def test_results_lines_are_strict_json_and_a_nan_that_slips_through_fails_loudly() -> None:
    failed = ItemResult(0, ItemState.FAILED, id="0", error=f"{MODEL_OUTPUT_NOT_FINITE}: ...")
    jsonl, table = io.StringIO(), io.StringIO()
    write_results(_Store([failed]), _job(), jsonl, table)  # type: ignore[arg-type]
    assert '"state": "failed"' in jsonl.getvalue() and "NaN" not in jsonl.getvalue()
    slipped = ItemResult(0, ItemState.SUCCEEDED, id="0", predictions=[("a", 0, math.nan)])
    with pytest.raises(ValueError, match="JSON compliant"):
        write_results(_Store([slipped]), _job(), io.StringIO(), io.StringIO())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="JSON compliant"):
        ItemResult(0, ItemState.SUCCEEDED, margin=math.inf).to_json()
