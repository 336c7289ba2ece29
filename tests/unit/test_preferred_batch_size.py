"""Choosing a form's batch size by timing it: the timing and choice logic, on a fake clock."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

from perito_core.models.batching import (
    BatchProfile,
    candidate_batch_sizes,
    choose_batch_size,
    measure_images_per_second,
    profile_batch_sizes,
)
from perito_core.models.engines.base import LoadedModel
from perito_core.models.manifest import Artifact, ModelManifest
from tests.helpers import TINY_INPUT, FakeClock


def timed_forward(
    clock: FakeClock, seconds_per_batch: dict[int, float], calls: list[int]
) -> Callable[[int], None]:
    def forward(size: int) -> None:
        calls.append(size)
        clock.now += seconds_per_batch[size]

    return forward


def rates_for(seconds_per_batch: dict[int, float]) -> dict[int, float]:
    clock, calls = FakeClock(), list[int]()
    forward = timed_forward(clock, seconds_per_batch, calls)
    return measure_images_per_second(forward, sorted(seconds_per_batch), clock=clock)


def test_batch_one_kept_when_it_is_fastest() -> None:
    # ONNX Runtime FP32 on 2 cores: one image at a time beat batches of 8.
    rates = rates_for({1: 0.010, 2: 0.022, 4: 0.045, 8: 0.095})
    assert rates[1] == pytest.approx(100.0)
    assert rates[8] == pytest.approx(8 / 0.095)
    assert choose_batch_size(rates) == 1


def test_smallest_size_within_three_percent_of_the_best() -> None:
    # 4 is the best (200/s); 2 is 2% under it, 1 is 20% under: 2 adds no latency for nothing.
    rates = rates_for({1: 1 / 160, 2: 2 / 196, 4: 4 / 200, 8: 8 / 199})
    assert choose_batch_size(rates) == 2
    # 5% under the best is too slow: the best itself is kept.
    assert choose_batch_size({1: 95.0, 2: 100.0}) == 2
    assert choose_batch_size({1: 97.5, 2: 100.0}) == 1


def test_bigger_batches_win_when_they_are_faster() -> None:
    rates = rates_for({1: 0.030, 2: 0.040, 4: 0.060})
    assert choose_batch_size(rates) == 4


def test_sizes_are_interleaved_and_each_round_meets_its_minimums() -> None:
    clock, calls = FakeClock(), list[int]()
    forward = timed_forward(clock, {1: 0.001, 4: 0.2}, calls)
    measure_images_per_second(
        forward, [1, 4], rounds=2, round_seconds=0.05, min_passes=2, clock=clock
    )
    # Round one ascending, round two descending; 1 runs 50 passes (0.05 s), 4 runs twice
    # (two passes although each is longer than a round's share).
    assert calls == [1] * 50 + [4] * 2 + [4] * 2 + [1] * 50


def test_a_slow_round_does_not_count_against_a_size() -> None:
    clock, calls = FakeClock(), list[int]()
    slow_once = {"left": 2}

    def forward(size: int) -> None:
        calls.append(size)
        # The machine is busy during the first two passes (size 1's first round).
        clock.now += 0.01 * (10 if slow_once["left"] else 1)
        slow_once["left"] = max(0, slow_once["left"] - 1)

    rates = measure_images_per_second(forward, [1, 2], round_seconds=0.0, clock=clock)
    assert rates[1] == pytest.approx(100.0)


def test_candidates_are_capped_by_max_batch_size() -> None:
    assert candidate_batch_sizes(1) == (1,)
    assert candidate_batch_sizes(4) == (1, 2, 4)
    assert candidate_batch_sizes(6) == (1, 2, 4, 6)
    assert candidate_batch_sizes(8) == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="at least 1"):
        candidate_batch_sizes(0)


class FakeModel(LoadedModel):
    """A loaded model whose forward pass only records the batch sizes it is given."""

    def __init__(self) -> None:
        manifest = ModelManifest(
            name="fake",
            version="1",
            labels=["a", "b"],
            input=TINY_INPUT,
            artifact=Artifact(sha256="a" * 64, size_bytes=10),
        )
        super().__init__(manifest, torch.device("cpu"), "torchscript-fp32")
        self.sizes: list[int] = []

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(batch.shape[0])
        return torch.full((batch.shape[0], 2), 0.5)


def test_profile_respects_the_cap_and_logs_its_choice(caplog: pytest.LogCaptureFixture) -> None:
    model = FakeModel()
    with caplog.at_level(logging.INFO, logger="perito_core.models.batching"):
        profile = profile_batch_sizes(model, max_batch_size=4)
    assert set(model.sizes) == {1, 2, 4}
    assert set(profile.images_per_second) == {1, 2, 4}
    assert 1 <= profile.preferred_batch_size <= 4
    assert profile.measured and profile.seconds > 0
    assert f"-> {profile.preferred_batch_size}" in caplog.text
    assert "fake@1, torchscript-fp32" in caplog.text


def test_throughput_only_callers_take_the_very_fastest_size() -> None:
    rates = {1: 97.5, 2: 100.0, 4: 99.0}
    assert choose_batch_size(rates) == 1
    assert choose_batch_size(rates, tolerance=0.0) == 2
    profile = profile_batch_sizes(FakeModel(), max_batch_size=2, tolerance=0.0)
    assert profile.tolerance == 0.0
    assert profile.preferred_batch_size == max(
        profile.images_per_second, key=profile.images_per_second.__getitem__
    )
    assert "within 0% of the best" in profile.summary()


def test_a_set_batch_size_skips_the_measurement() -> None:
    model = FakeModel()
    profile = profile_batch_sizes(model, max_batch_size=8, preferred_batch_size=2)
    assert profile == BatchProfile(2)
    assert model.sizes == []
    assert not profile.measured
    assert "set, not measured" in profile.summary()
    with pytest.raises(ValueError, match="max_batch_size"):
        profile_batch_sizes(model, max_batch_size=4, preferred_batch_size=8)
