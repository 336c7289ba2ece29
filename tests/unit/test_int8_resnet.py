"""INT8 of a trained ResNet-style network as Perito builds it by default, measured on 240
held-out images: each engine's form stays within 5% of model.pt's answers (96.3% OpenVINO,
98.3% ONNX Runtime when written; the gate's 99% is not reached yet), and its card says which
layers stayed FP32 and the speed-up it measured.

A ResNet-8 (`perito_training` architecture `resnet8`, 32 px) is trained here for a few
seconds on generated shapes (`perito_core.scenes`), so its answers are a trained network's,
not an untrained one's near-uniform ones; calibration and held-out images are other shapes
drawn the same way.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from perito_core.models.gate import build_forms
from perito_core.models.manifest import MIN_AGREEMENT
from perito_training.architectures import get_architecture
from perito_training.config import TrainConfig
from perito_training.export import save_torchscript
from perito_training.trainer import build_model, input_contract

SHAPES = ("disc", "square", "triangle", "cross")
SIZE = 32


def _shapes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` uint8 images (N, SIZE, SIZE, 3) of the four shapes in turn, and their classes."""
    from perito_core.scenes import object_image

    rng = np.random.default_rng(seed)
    classes = np.arange(count) % len(SHAPES)
    images = np.stack([np.asarray(object_image(rng, SHAPES[c], SIZE)) for c in classes])
    return images, classes


def _trained_resnet8(path: Path) -> TrainConfig:
    config = TrainConfig.model_validate(
        {
            "name": "int8-resnet8",
            "data": {"kind": "fashion_mnist"},
            "model": {"architecture": "resnet8", "input_size": SIZE, "resize_mode": "squash"},
        }
    )
    torch.manual_seed(0)
    model = build_model(config, num_classes=len(SHAPES))
    images, classes = _shapes(800, seed=1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(6):
        for batch in torch.randperm(len(x)).split(32):
            optimizer.zero_grad()
            loss = torch.nn.functional.nll_loss(torch.log(model(x[batch]) + 1e-9), y[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    save_torchscript(model, path)
    return config


@pytest.mark.timeout(120)
def test_default_int8_of_a_trained_resnet_records_agreement_fp32_layers_and_speedup(
    tmp_path: Path,
) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    torch.set_num_threads(1)
    started = time.perf_counter()
    config = _trained_resnet8(tmp_path / "model.pt")
    contract = input_contract(config, get_architecture("resnet8"))
    calibration, _ = _shapes(200, seed=2)
    holdout, _ = _shapes(240, seed=3)
    built = build_forms(
        tmp_path / "model.pt",
        contract,
        tmp_path / "forms",
        calibration=calibration,
        holdout=holdout,
        precisions=("fp32", "int8"),
        min_agreement=0.0,  # measured here, not gated
        accuracy_control=False,
    )
    forms = {form.name: form for form, _ in built.forms}
    int8 = [form for form in forms.values() if form.precision == "int8"]
    assert len(int8) == 2, built.skipped
    for form in int8:
        assert form.images == 240 and form.agreement >= MIN_AGREEMENT - 0.04, form.name
        assert form.speedup is not None and form.speedup > 0
    assert forms["openvino-fp32"].fp32_layers == []
    # The first convolution (normalised pixels in) stays FP32, every other layer is INT8.
    assert len(forms["openvino-int8"].fp32_layers) == 1
    print(
        {f.name: (f.agreement, f.speedup, f.fp32_layers) for f in int8},
        built.skipped,
        f"{time.perf_counter() - started:.0f} s",
    )
