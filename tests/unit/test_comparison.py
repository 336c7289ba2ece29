"""Counting how two versions answered the same images: agreement, confusion, shift."""

from __future__ import annotations

import numpy as np
import pytest

from perito_core.models.comparison import Comparison, shift_bin


def test_agreement_confusion_and_shift_by_label() -> None:
    comparison = Comparison("car-damage", "3", "4")
    incumbent = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    # The candidate orders its labels the other way round.
    candidate = np.array([[0.05, 0.95], [0.7, 0.3], [0.7, 0.3]])
    rows = comparison.add(incumbent, candidate, ["minor", "severe"], ["severe", "minor"])
    assert [row[:2] for row in rows] == [
        ("minor", "minor"),
        ("severe", "severe"),
        ("minor", "severe"),
    ]
    assert comparison.compared == 3 and comparison.agreed == 2
    assert comparison.confusion == {
        ("minor", "minor"): 1,
        ("severe", "severe"): 1,
        ("minor", "severe"): 1,
    }
    assert comparison.mean_shift == pytest.approx((0.05 - 0.1 + 0.1) / 3)
    assert sum(comparison.shift) == 3


def test_fields_round_trip_and_merge() -> None:
    comparison = Comparison("m", "1", "2")
    rng = np.random.default_rng(0)
    a, b = rng.dirichlet(np.ones(3), 50), rng.dirichlet(np.ones(3), 50)
    comparison.add(a, b, ["x", "y", "z"], ["x", "y", "z"])
    fields = {name: str(value) for name, value in comparison.fields().items()}
    again = Comparison.from_fields("m", "1", "2", fields)
    assert again.compared == 50 and again.agreed == comparison.agreed
    assert again.confusion == comparison.confusion and again.shift == comparison.shift
    again.merge(comparison)
    assert again.compared == 100 and again.agreement == comparison.agreement


def test_shift_bins_cover_the_range() -> None:
    assert shift_bin(-1.0) == 0 and shift_bin(1.0) == 19 and shift_bin(0.0) == 10
