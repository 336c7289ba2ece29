"""The confidence intervals the accuracy gate and model comparison report."""

from __future__ import annotations

import pytest

from perito_core.stats import paired_difference_interval, wilson_interval


def test_wilson_interval() -> None:
    # 100% of 32 images only says the agreement is above about 89%; of 200, above 98.1%.
    low, high = wilson_interval(32, 32)
    assert 0.89 < low < 0.9 and high == 1.0
    assert wilson_interval(200, 200)[0] == pytest.approx(0.9812, abs=1e-3)
    low, high = wilson_interval(700, 1000)
    assert low == pytest.approx(0.6709, abs=1e-3) and high == pytest.approx(0.7275, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_difference_interval_matches_a_published_example() -> None:
    # Fagerland, Lydersen and Laake, "Statistical Analysis of Contingency Tables" (2017),
    # chapter 8, the paired table of Cavo et al. (2012): 59 both, 6 first only, 16 second
    # only, 80 neither; difference -0.0621, Newcombe square-and-add -0.1186 to -0.0046.
    low, high = paired_difference_interval(59, 6, 16, 80)
    assert low < -10 / 161 < high
    assert low == pytest.approx(-0.1186, abs=2e-3) and high == pytest.approx(-0.0046, abs=2e-3)


def test_paired_difference_interval_narrows_with_images_and_shows_a_real_loss() -> None:
    # No discordant image: the change is 0, and its interval narrows as images are added.
    small = paired_difference_interval(30, 0, 0, 10)
    large = paired_difference_interval(300, 0, 0, 100)
    assert small[0] < 0 < small[1] and large[0] < 0 < large[1]
    assert large[1] - large[0] < small[1] - small[0]
    # 12 images the form lost, none it won, of 400: a loss the interval excludes 0 from.
    low, high = paired_difference_interval(300, 0, 12, 88)
    assert low < -0.03 < high < 0
    assert paired_difference_interval(0, 0, 0, 0) == (-1.0, 1.0)
