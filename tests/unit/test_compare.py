"""`perito models compare`'s table and JSON: the figures a reader acts on."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from perito.v1.vocabulary import JobState
from perito_core.jobs.store import Job
from perito_core.models.comparison import SHIFT_BINS, Comparison
from perito_server.compare import FailedItem, Report, progress_line, table


def comparison_of(pairs: dict[tuple[str, str], int], shift: float = -0.05) -> Comparison:
    """A comparison of `pairs` (incumbent's label, candidate's label) -> images, every image
    answered with `shift` (candidate minus incumbent) in top-1 probability."""
    comparison = Comparison("car-damage", "3", "4")
    for (a, b), count in pairs.items():
        labels = sorted({a, b})
        for _ in range(count):
            incumbent = np.array([[0.9 if label == a else 0.1 for label in labels]])
            candidate = np.array([[0.9 + shift if label == b else 0.1 for label in labels]])
            comparison.add(incumbent, candidate, labels, labels)
    return comparison


SMALL = {
    ("minor", "minor"): 60,
    ("severe", "severe"): 25,
    ("minor", "moderate"): 10,
    ("severe", "moderate"): 5,
}


def test_the_table_gives_agreement_with_its_interval_shift_and_confusion() -> None:
    text = table(Report(comparison_of(SMALL), "shadow"))
    lines = text.splitlines()
    assert "images compared    100" in lines
    # 85 of 100: Wilson's 95% interval is 76.7% to 90.7%.
    assert "top-1 agreement    85.0%  (85 images; 95% interval 76.7% to 90.7%)" in lines
    assert lines[3].startswith("confidence shift   -0.050 mean")
    # One histogram bar: every shift is -0.05, in [-0.1, +0.0).
    assert [line for line in lines if "#" in line] == [f"  [-0.1, +0.0)  {'#' * 30}  100"]
    # The matrix: incumbent's labels as rows, candidate's as columns, sorted.
    start = lines.index("confusion (rows: version 3's top-1, columns: version 4's)")
    assert lines[start + 1].split() == ["minor", "moderate", "severe"]
    assert lines[start + 2].split() == ["minor", "60", "10", "0"]
    assert lines[start + 3].split() == ["severe", "0", "5", "25"]
    # Disagreements, most frequent first.
    start = next(i for i, line in enumerate(lines) if line.startswith("disagreements"))
    assert [line.split() for line in lines[start + 1 :]] == [
        ["minor", "->", "moderate", "10"],
        ["severe", "->", "moderate", "5"],
    ]


def test_many_labels_list_the_most_frequent_disagreements_only() -> None:
    pairs = {(f"class-{i:02d}", f"class-{i:02d}"): 50 for i in range(30)}
    pairs |= {(f"class-{i:02d}", f"class-{i + 1:02d}"): 30 - i for i in range(29)}
    text = table(Report(comparison_of(pairs), "shadow"))
    assert "confusion (rows" not in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("disagreements"))
    assert "(10 of 29 pairs;" in lines[start]
    listed = [line.split() for line in lines[start + 1 :]]
    assert listed[0] == ["class-00", "->", "class-01", "30"]
    assert [int(row[-1]) for row in listed] == list(range(30, 20, -1))


def test_the_histogram_spans_the_shifts_seen_and_scales_to_the_fullest_bin() -> None:
    comparison = Comparison("m", "1", "2")
    comparison.shift_sum, comparison.compared, comparison.agreed = -0.3, 4, 4
    comparison.confusion = Counter({("a", "a"): 4})
    comparison.shift[7], comparison.shift[9] = 3, 1  # [-0.3, -0.2) and [-0.1, +0.0)
    lines = [line for line in table(Report(comparison, "shadow")).splitlines() if "[" in line]
    assert [line.split()[:2] for line in lines] == [
        ["[-0.3,", "-0.2)"],
        ["[-0.2,", "-0.1)"],
        ["[-0.1,", "+0.0)"],
    ]
    bars = [line.split()[2] if "#" in line else "" for line in lines]
    assert [len(bar) for bar in bars] == [30, 0, 10]
    assert "no disagreements" in table(Report(comparison, "shadow"))


def test_nothing_compared_says_so() -> None:
    text = table(Report(Comparison("m", "1", "2"), "shadow"))
    assert "images compared    0" in text and "nothing compared yet" in text
    assert "agreement" not in text


def test_the_json_holds_every_figure_of_the_table() -> None:
    report = Report(
        comparison_of(SMALL),
        "images",
        images="s3://claims/2024-06/",
        jobs={"3": "a1", "4": "b2"},
        failed=[FailedItem(7, "x.png", "s3://claims/2024-06/x.png", {"3": "", "4": "failed: E"})],
    )
    data = json.loads(json.dumps(report.as_json()))
    assert (data["compared"], data["agreed"], data["agreement"]) == (100, 85, 0.85)
    assert data["agreement_interval"] == pytest.approx([0.767, 0.907], abs=5e-4)
    assert data["mean_shift"] == pytest.approx(-0.05)
    assert len(data["shift_histogram"]["edges"]) == SHIFT_BINS + 1
    assert data["shift_histogram"]["counts"][9] == 100
    assert data["confusion"][0] == {"incumbent": "minor", "candidate": "minor", "images": 60}
    assert [cell["images"] for cell in data["confusion"]] == [60, 25, 10, 5]
    assert data["jobs"] == {"3": "a1", "4": "b2"}
    assert data["failed"] == [
        {
            "index": 7,
            "id": "x.png",
            "uri": "s3://claims/2024-06/x.png",
            "errors": report.failed[0].errors,
        }
    ]
    text = table(report)
    assert "not compared       1 (failed on either side)" in text
    assert "  x.png  version 4: failed: E" in text.splitlines()


def test_progress_names_each_version_and_its_failures() -> None:
    jobs = [
        Job("a", JobState.RUNNING, "m", "3", total=400, succeeded=118, failed=2),
        Job("b", JobState.SUCCEEDED, "m", "4", total=400, succeeded=400),
    ]
    assert progress_line(jobs) == (
        "version 3: 120/400 done (2 failed), running; version 4: 400/400 done, succeeded"
    )
