"""ONNX Runtime as a second engine for compiled forms: a TorchScript version gets
`onnxruntime-fp32` (the network exported to ONNX) and `onnxruntime-int8` (static QDQ INT8)
beside OpenVINO's, each through the same accuracy gate, listed with its sha256, verified
before it loads, and served with the form's own calibration; `auto` serves whichever verified
form runs fastest. Skipped with a reason where ONNX Runtime is not installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from perito_core.models.registry import ModelRegistry
from perito_core.models.selection import load_model
from tests.conftest import build_tiny_forms, publish_tiny
from tests.helpers import TINY_INPUT

pytest.importorskip("onnxruntime", reason="ONNX Runtime (optional engine, perito[serve]) missing")


def _images(count: int, seed: int) -> np.ndarray:
    spec = TINY_INPUT.spec()
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, spec.height, spec.width, 3), dtype=np.uint8)


@pytest.fixture
def registry(tiny_model_file: Path, tmp_path: Path) -> ModelRegistry:
    built = build_tiny_forms(
        tiny_model_file,
        tmp_path / "forms",
        precisions=("fp32", "int8"),
        engines=("onnxruntime",),
        min_agreement=0.0,  # random images and weights: the gate itself is tested elsewhere
    )
    assert [form.name for form, _ in built.forms] == ["onnxruntime-fp32", "onnxruntime-int8"]
    fp32, int8 = (form for form, _ in built.forms)
    assert fp32.engine == "onnxruntime" and fp32.agreement == 1.0 and fp32.max_abs_diff < 1e-5
    assert int8.quantization.startswith("post-training (QDQ, per-channel")
    assert all(len(form.files) == 1 and form.files[0].file == "model.onnx" for form in (fp32, int8))
    registry = ModelRegistry.open(str(tmp_path / "registry"), cache_dir=tmp_path / "cache")
    publish_tiny(registry, tiny_model_file, forms=built.forms, skipped_forms=built.skipped)
    return registry


def test_the_fp32_form_serves_what_torchscript_serves(registry: ModelRegistry) -> None:
    exported = load_model(registry, "tiny", "1", precision="fp32")
    reference = load_model(registry, "tiny", "1", precision="torchscript")
    assert (exported.form, reference.form) == ("onnxruntime-fp32", "torchscript-fp32")
    images = _images(5, 3)
    np.testing.assert_allclose(exported.predict(images), reference.predict(images), atol=1e-5)
    assert load_model(registry, "tiny", "1", precision="int8").form == "onnxruntime-int8"


def test_auto_serves_a_verified_form_and_says_why_not_the_others(registry: ModelRegistry) -> None:
    served = load_model(registry, "tiny", "1", precision="auto", warmup_batch_sizes=(1, 4))
    assert served.form in ("onnxruntime-fp32", "onnxruntime-int8")
    other = ({"onnxruntime-fp32", "onnxruntime-int8"} - {served.form}).pop()
    assert "slower here" in served.passed_over[other]


def test_a_tampered_onnx_form_is_refused_and_torchscript_answers(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    stored = tmp_path / "registry" / "models" / "tiny" / "1" / "forms" / "onnxruntime-fp32"
    onnx_file = stored / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-16] + b"\0" * 16)
    for cached in (tmp_path / "cache").rglob("model.onnx"):
        cached.unlink()  # the copy verified before the change
    served = load_model(registry, "tiny", "1", precision="fp32")
    assert served.form == "torchscript-fp32"
    assert "sha256" in served.passed_over["onnxruntime-fp32"]


def test_only_the_forms_kept_are_left_in_the_output_folder(
    tiny_model_file: Path, tmp_path: Path
) -> None:
    """INT8 alone: the FP32 ONNX model it was quantized from is removed with the refused
    forms, as OpenVINO's FP32 IR is."""
    kept = build_tiny_forms(
        tiny_model_file,
        tmp_path / "kept",
        precisions=("int8",),
        engines=("onnxruntime",),
        min_agreement=0.0,
    )
    assert [form.name for form, _ in kept.forms] == ["onnxruntime-int8"]
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["onnxruntime-int8"]
    refused = build_tiny_forms(  # nothing passes
        tiny_model_file,
        tmp_path / "refused",
        precisions=("fp32", "int8"),
        engines=("onnxruntime",),
        min_agreement=1.01,
    )
    assert refused.forms == [] and list((tmp_path / "refused").iterdir()) == []
