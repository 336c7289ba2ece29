"""OpenVINO INT8's accuracy control is bounded in time: the quantized groups are ranked once,
the fewest to revert found by bisection, and at the bound the search stops with what it has
(the gate judges that form)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from perito_core.models.engines import openvino as openvino_engine
from perito_core.models.manifest import InputContract
from tests.helpers import FakeClock


def _search(
    threshold: int, total: int, clock: FakeClock, step: float, end: float | None
) -> tuple[tuple[int, object | None], list[int]]:
    """`fewest_reverted` where reverting `threshold` or more groups meets the target and each
    validation takes `step` seconds; returns its answer and the counts it validated."""
    tried: list[int] = []

    def meets(count: int) -> tuple[bool, object]:
        tried.append(count)
        clock.now += step
        return count >= threshold, f"model with {count}"

    return openvino_engine.fewest_reverted(total, meets, end=end, clock=clock), tried


def test_the_fewest_groups_are_found_by_bisection() -> None:
    clock = FakeClock(100.0)
    (count, model), tried = _search(7, 34, clock, 4.0, end=None)
    assert (count, model) == (7, "model with 7")
    assert len(tried) <= 6 and 6 in tried  # log2(34) validations, 6 seen to fail
    # Nothing under all of them meets it: all are to be reverted, that model not yet built.
    assert _search(40, 34, FakeClock(100.0), 4.0, end=None)[0] == (34, None)


def test_the_search_stops_at_the_bound_with_what_it_has() -> None:
    clock = FakeClock(100.0)
    # 10 s per validation, 25 s allowed: three validations (17 fails, 8 fails, 4 fails).
    (count, model), tried = _search(2, 34, clock, 10.0, end=clock.now + 25.0)
    assert tried == [17, 8, 4] and (count, model) == (4, "model with 4")
    # A pass found before the bound is kept: 17 meets it, then time is up.
    clock = FakeClock(100.0)
    (count, model), tried = _search(10, 34, clock, 10.0, end=clock.now + 5.0)
    assert tried == [17] and (count, model) == (17, "model with 17")
    # No time at all: nothing validated, nothing reverted.
    clock = FakeClock(100.0)
    assert _search(10, 34, clock, 10.0, end=clock.now)[0] == (0, None)


def test_with_no_time_left_nothing_is_reverted() -> None:
    pytest.importorskip("nncf")
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 5),
        torch.nn.Softmax(1),
    ).eval()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = network

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.inner(images.float() / 255.0)  # type: ignore[no-any-return]

    module = torch.jit.script(Wrapped())
    contract = InputContract(height=16, width=16, resize_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    ov_model = openvino_engine.convert(module, contract)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    start = time.perf_counter()
    # Fidelity 1.0 (no probability moves) no INT8 reaches, and no time to restore it.
    quantized = openvino_engine.quantize(
        ov_model, images, validation=images, min_agreement=1.0, metric="fidelity", seconds=0.0
    )
    assert time.perf_counter() - start < 60
    kept = openvino_engine.fp32_layers(quantized)
    # Only the first convolution, as plain INT8 keeps it: none reverted.
    assert kept == ["conv 1 3x3 3->8"], kept
