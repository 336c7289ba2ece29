"""OpenVINO INT8's accuracy control is bounded in time: past its bound the metric reports the
target met without running the model, so NNCF stops with the layers it has reverted so far
and the gate judges what it got."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import pytest
import torch

from perito_core.models.engines import openvino as openvino_engine
from perito_core.models.manifest import InputContract

Items = Iterable[tuple[np.ndarray, np.ndarray]]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_metric_runs_until_the_bound_then_reports_the_target_met() -> None:
    calls: list[int] = []

    def metric(compiled: object, items: Items) -> tuple[float, list[float]]:
        values = [0.0 for _ in items]
        calls.append(len(values))
        return 0.5, values

    clock = _Clock()
    bounded = openvino_engine._Deadline(metric, 30.0, clock)
    items = [(np.zeros(1), np.zeros(1))] * 4
    assert bounded(object(), items) == (0.5, [0.0] * 4) and not bounded.expired
    clock.now += 29.9
    assert bounded(object(), items)[0] == 0.5
    clock.now += 0.1
    assert bounded(object(), items) == (1.0, [1.0] * 4) and bounded.expired
    assert calls == [4, 4]  # the model was not run once the bound had passed
    unbounded = openvino_engine._Deadline(metric, None, clock)
    clock.now += 1e6
    assert unbounded(object(), items)[0] == 0.5 and not unbounded.expired


def test_nncf_stops_at_the_bound_with_the_plain_quantization() -> None:
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
    first = openvino_engine.first_convolution(ov_model)
    assert kept == [first]  # only the first convolution, as plain INT8 keeps it: none reverted
