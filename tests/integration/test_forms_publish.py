"""`perito publish --forms`: a trained run's compiled forms, calibrated on its validation split
and gated on its test split, with the evidence in the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from perito_core.models.forms import load_model
from perito_core.models.registry import ModelRegistry
from perito_training.pipeline import publish_run, train_run
from tests.helpers import write_pattern_images
from tests.integration.test_training import quick_config

pytest.importorskip("openvino", reason="OpenVINO (optional engine, perito[serve]) not installed")
pytest.importorskip("nncf", reason="NNCF (INT8 quantization) not installed")

pytestmark = pytest.mark.integration


def test_publish_builds_gates_and_records_the_forms(tmp_path: Path) -> None:
    patterns = write_pattern_images(tmp_path / "patterns", per_class=60, size=40)
    run = tmp_path / "run"
    card = train_run(quick_config(patterns), run, log=lambda _: None, progress=False)
    registry = ModelRegistry.open(str(tmp_path / "registry"), cache_dir=tmp_path / "cache")
    lines: list[str] = []
    manifest = publish_run(run, registry, forms=("fp32", "int8", "bf16"), log=lines.append)

    forms = {form.name: form for form in manifest.forms}
    assert "openvino-fp32" in forms, manifest.skipped_forms
    fp32 = forms["openvino-fp32"]
    assert fp32.agreement == 1.0 and fp32.evaluated_on == "test split" and fp32.images == 36
    assert fp32.accuracy == pytest.approx(card.metrics.accuracy)
    assert fp32.ece is not None
    # Temperature and threshold re-fitted on the form's own outputs over the validation split
    # (as the trainer fitted model.pt's), never on the test split that gates it.
    assert fp32.temperature > 0 and fp32.calibration_fitted_on == "calibration images"
    assert fp32.confidence_threshold is not None  # the recipe's calibration.target_accuracy
    # INT8 either passed the gate (and then within 0.3 points) or was refused with its reason.
    if "openvino-int8" in forms:
        int8 = forms["openvino-int8"]
        assert int8.agreement >= 0.99 and int8.calibration_images == 36  # the val split
        assert int8.accuracy is not None and int8.accuracy >= fp32.accuracy - 0.003  # type: ignore[operator]
        # Plain post-training INT8 first; accuracy control only when the gate refused it.
        assert int8.quantization in ("post-training", "accuracy-control")
    else:
        assert "gate" in manifest.skipped_forms["openvino-int8"]
    assert "openvino-bf16" in forms or "BF16" in manifest.skipped_forms["openvino-bf16"]
    assert any(line.startswith("openvino-fp32: top-1 agreement 100.00%") for line in lines)

    served = load_model(registry, manifest.name, manifest.version, precision="auto")
    assert served.form in forms
