"""FP16 of model.pt, served only where it agrees with FP32 (`perito_core.models.reduced_precision`):
the decision run on the CPU, with a real artifact in float16 and bfloat16, a form that
disagrees, and modules FP16 cannot be made of."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from perito_core.models.engines.base import LoadedModel
from perito_core.models.engines.torchscript import ReducedPrecisionClassifier, TorchScriptModel
from perito_core.models.reduced_precision import (
    agreement_verdict,
    held_out_images,
    serve_fp16,
    serve_reduced,
    serve_verified,
)
from tests.helpers import TINY_INPUT, logged, tiny_network, unpublished_manifest

MANIFEST = unpublished_manifest(["minor", "moderate", "severe"])


def fp32(path: Path) -> TorchScriptModel:
    return TorchScriptModel.load(path, MANIFEST, device="cpu", warmup_batch_sizes=(1, 2))


@pytest.mark.parametrize(
    ("dtype", "form"), [(torch.float16, "torchscript-fp16"), (torch.bfloat16, "torchscript-bf16")]
)
def test_a_reduced_form_that_agrees_serves(
    tiny_model_file: Path, dtype: torch.dtype, form: str
) -> None:
    model = fp32(tiny_model_file)
    images = held_out_images(TINY_INPUT.spec())
    assert images[0].shape == (240, 32, 32, 3) and images[0].dtype == np.uint8
    served = serve_reduced(model, (1, 2), dtype=dtype, images=images)
    assert served.form == form, model.passed_over
    assert isinstance(served, TorchScriptModel) and served.device == model.device
    assert isinstance(served.module, ReducedPrecisionClassifier)
    assert {p.dtype for p in served.module.network.parameters()} == {dtype}
    batch = images[0][:4]
    out = served.predict(batch)
    assert out.dtype == np.float32 and out.shape == (4, 3)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out, model.predict(batch), atol=0.02)


class Disagreeing(LoadedModel):
    """A form whose top class is the reference's second: what a network that overflows in
    FP16 would answer."""

    def __init__(self, reference: LoadedModel) -> None:
        super().__init__(reference.manifest, reference.device, "torchscript-fp16")
        self.reference = reference

    def predict(self, images: np.ndarray) -> np.ndarray:
        probabilities = self.reference.predict(images)
        order = np.argsort(probabilities, axis=1)
        swapped = probabilities.copy()
        rows = np.arange(len(images))
        swapped[rows, order[:, -1]] = probabilities[rows, order[:, -2]]
        swapped[rows, order[:, -2]] = probabilities[rows, order[:, -1]]
        return swapped


def test_a_form_that_disagrees_is_passed_over_with_the_reason(tiny_model_file: Path) -> None:
    model = fp32(tiny_model_file)
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), np.uint8)
    with logged("perito_core.models.reduced_precision", logging.WARNING) as messages:
        served = serve_verified(model, Disagreeing(model), images, "random images")
    assert served is model and served.form == "torchscript-fp32"
    reason = model.passed_over["torchscript-fp16"]
    assert "top-1 agreement with model.pt 0.00% is under the gate's 99.00%" in reason
    assert "40 random images" in reason and "0 of 40 agree" in reason
    assert any("not serving torchscript-fp16" in message for message in messages)


def test_the_verdict_is_the_gates_rule_with_its_bound() -> None:
    reference = np.eye(3, dtype=np.float32)[np.arange(300) % 3] * 0.8 + 0.2 / 3
    candidate = reference.copy()
    candidate[:2] = np.roll(reference[:2], 1, axis=1)  # two of 300 flipped: 99.33%, passes
    evidence, refused = agreement_verdict(reference, candidate, "test images")
    assert refused is None
    assert evidence.startswith("top-1 agreement with FP32 99.33% on 300 test images")
    assert "95% lower bound" in evidence and "weak gate" not in evidence
    candidate[:4] = np.roll(reference[:4], 1, axis=1)  # four: 98.67%, refused
    _, refused = agreement_verdict(reference, candidate, "test images")
    assert refused is not None and "98.67% is under the gate's 99.00%" in refused
    few, _ = agreement_verdict(reference[:50], reference[:50], "test images")
    assert "weak gate: 50 held-out images" in few


def test_a_module_without_the_artifacts_parts_serves_fp32(tmp_path: Path) -> None:
    class Plain(torch.nn.Module):  # uint8 in, probabilities out: no network of its own
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(tiny_network(3), torch.nn.Softmax(1))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.layers(images.float() / 255)
            return out

    plain = tmp_path / "plain.pt"
    example = torch.zeros((1, 3, 32, 32), dtype=torch.uint8)
    with warnings.catch_warnings():  # torch marks tracing deprecated; the artifact format
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(Plain().eval(), example).save(str(plain))  # type: ignore[no-untyped-call]
    model = TorchScriptModel.load(plain, MANIFEST, device="cpu", optimize=False)
    images = np.zeros((4, 32, 32, 3), np.uint8), "zeros"
    assert serve_reduced(model, images=images) is model
    assert "has no network, scale, shift, temperature" in model.passed_over["torchscript-fp16"]


def test_fp16_is_asked_for_on_cuda_only(tiny_model_file: Path) -> None:
    model = fp32(tiny_model_file)
    assert serve_fp16(model) is model and model.passed_over == {}
